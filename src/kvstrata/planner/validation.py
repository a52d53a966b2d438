"""Predictions against published measurements (data/validation.json).

Each row names a model, a machine, the configuration measured and one metric. The planner predicts
the metric with the same code `kvstrata plan` runs; error = predicted / measured - 1. Rows marked
`fitted` set a catalog constant (`kvstrata.planner.fit`) and are not evidence; the summary states the
error over all rows and over the held-out rows separately. The bounds in the data file are what
tests/planner/test_validation.py enforces: they guard against regressions and record how far the
model is from reality, they are not a claim of accuracy.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kvstrata.planner.catalog import HardwareSpec, catalog_section, load_catalog
from kvstrata.planner.modelspec import builtin_model
from kvstrata.planner.perf import PlanOptions, PlanResult, max_sessions, plan
from kvstrata.planner.workloads import Workload

DATA = Path(__file__).parent / "data" / "validation.json"
METRICS = ("tokens_per_s_per_user", "e2e_tokens_per_s_per_user", "tokens_per_s_aggregate_per_device", "ttft_s")


@dataclass(frozen=True)
class ValidationRow:
    id: str
    metric: str
    measured: float
    predicted: float | None
    devices: int | None
    batch: int
    fitted: bool
    source: str
    note: str

    @property
    def error(self) -> float | None:
        return None if self.predicted is None else self.predicted / self.measured - 1.0

    @property
    def factor(self) -> float | None:
        """max(pred/meas, meas/pred): how many times off, >= 1."""
        if self.predicted is None or self.predicted <= 0:
            return None
        r = self.predicted / self.measured
        return max(r, 1 / r)


def load_rows() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def metric_of(result: PlanResult, metric: str) -> float | None:
    if not result.fits:
        return None
    if metric == "tokens_per_s_aggregate_per_device":
        return result.tokens_per_s_aggregate / result.devices
    if metric == "e2e_tokens_per_s_per_user":  # what a latency benchmark times: TTFT, then the other tokens
        wl_out = result.output_tokens
        return wl_out / (result.ttft_s + (wl_out - 1) / result.tokens_per_s_per_user)
    return getattr(result, metric)


def spec_options(name: str | None, profiles: Mapping[str, Any]) -> dict[str, Any]:
    if not name:
        return {}
    p = profiles[name]
    return {"spec_tokens_per_step": float(p["accepted_tokens_per_step"]), "spec_draft_tokens": int(p["draft_tokens"]),
            "spec_draft_model": p["draft_model"]}


def predict_row(row: Mapping[str, Any], catalog: Mapping[str, HardwareSpec],
                profiles: Mapping[str, Any] | None = None) -> tuple[float | None, PlanResult]:
    model, hw = builtin_model(row["model"]), catalog[row["hardware"]]
    prompt, output = int(row["prompt"]), int(row["output"])
    opts = PlanOptions(weight_dtype=row.get("weight_dtype"), kv_dtype=row.get("kv_dtype"), devices=row.get("devices"),
                       compute_dtype=row.get("compute_dtype"),
                       **spec_options(row.get("spec"), profiles if profiles is not None else catalog_section("spec_profiles")))
    batch = row["batch"]
    if batch == "max":  # as many sequences as device memory holds at their full length
        n = opts.devices or plan(model, hw, Workload("probe", "", 1, 0, prompt, output), opts).devices or 1
        batch = min(int(row.get("max_batch") or 1 << 30),
                    max(1, max_sessions(model, hw, n, prompt + output, opts.weight_dtype, opts.kv_dtype, opts.reserve)))
    wl = Workload(row["id"], "published measurement", sessions=int(batch), context_tokens=0,
                  prompt_tokens=prompt, output_tokens=output)
    res = plan(model, hw, wl, opts)
    return metric_of(res, row["metric"]), res


def run_validation(catalog: Mapping[str, HardwareSpec] | None = None,
                   profiles: Mapping[str, Any] | None = None) -> list[ValidationRow]:
    catalog = catalog or load_catalog()[0]
    out = []
    for row in load_rows()["rows"]:
        pred, res = predict_row(row, catalog, profiles)
        out.append(ValidationRow(row["id"], row["metric"], float(row["measured"]), pred, res.devices, res.sessions,
                                 bool(row.get("fitted", False)), row["source"], row.get("note", "")))
    return out


def summary(rows: list[ValidationRow]) -> dict[str, float]:
    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else math.inf

    rel = [abs(r.error) for r in rows if r.predicted]
    held = [abs(r.error) for r in rows if r.predicted and not r.fitted]
    logs = [abs(math.log(r.predicted / r.measured)) for r in rows if r.predicted]
    return {"rows": len(rows), "fitted_rows": sum(r.fitted for r in rows), "held_out_rows": len(held),
            "max_factor": max(r.factor or math.inf for r in rows),
            "max_factor_held_out": max((r.factor or math.inf for r in rows if not r.fitted), default=math.inf),
            "median_abs_rel_error": med(rel), "median_abs_rel_error_held_out": med(held),
            "median_abs_log_error": med(logs)}


def markdown_table(rows: list[ValidationRow]) -> str:
    lines = ["| row | metric | devices | batch | predicted | measured | error | fitted |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        pred = "n/a" if r.predicted is None else f"{r.predicted:,.4g}"
        err = "n/a" if r.error is None else f"{r.error:+.0%}"
        lines.append(f"| {r.id} | {r.metric} | {r.devices} | {r.batch} | {pred} | {r.measured:,.4g} | {err} | "
                     f"{'yes' if r.fitted else ''} |")
    return "\n".join(lines)


def summary_line(s: Mapping[str, float]) -> str:
    return (f"{s['rows']} rows ({s['fitted_rows']} fitted, {s['held_out_rows']} held out): median |error| "
            f"{s['median_abs_rel_error']:.1%} over all rows, {s['median_abs_rel_error_held_out']:.1%} over the held-out "
            f"rows; worst {s['max_factor']:.2f}x (held out {s['max_factor_held_out']:.2f}x)")
