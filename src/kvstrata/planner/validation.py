"""Predictions against published measurements (data/validation.json).

Each row names a model, a machine, the configuration measured and one metric. The planner predicts
the metric with the same code `kvstrata plan` runs; error = predicted / measured - 1. The bounds in
the data file (`max_factor`, `max_median_abs_log_error`) are what tests/planner/test_validation.py
enforces: they guard against regressions and record how far the model is from reality, they are
not a claim of accuracy.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kvstrata.planner.catalog import HardwareSpec, load_catalog
from kvstrata.planner.modelspec import builtin_model
from kvstrata.planner.perf import PlanOptions, PlanResult, plan
from kvstrata.planner.workloads import Workload

DATA = Path(__file__).parent / "data" / "validation.json"


@dataclass(frozen=True)
class ValidationRow:
    id: str
    metric: str
    measured: float
    predicted: float | None
    devices: int | None
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
    return getattr(result, metric)


def predict_row(row: Mapping[str, Any], catalog: Mapping[str, HardwareSpec]) -> tuple[float | None, PlanResult]:
    wl = Workload(row["id"], "published measurement", sessions=int(row["batch"]), context_tokens=0,
                  prompt_tokens=int(row["prompt"]), output_tokens=int(row["output"]))
    opts = PlanOptions(weight_dtype=row.get("weight_dtype"), kv_dtype=row.get("kv_dtype"), devices=row.get("devices"))
    res = plan(builtin_model(row["model"]), catalog[row["hardware"]], wl, opts)
    return metric_of(res, row["metric"]), res


def run_validation(catalog: Mapping[str, HardwareSpec] | None = None) -> list[ValidationRow]:
    catalog = catalog or load_catalog()[0]
    out = []
    for row in load_rows()["rows"]:
        pred, res = predict_row(row, catalog)
        out.append(ValidationRow(row["id"], row["metric"], float(row["measured"]), pred, res.devices,
                                 bool(row.get("fitted", False)), row["source"], row.get("note", "")))
    return out


def summary(rows: list[ValidationRow]) -> dict[str, float]:
    logs = [abs(math.log(r.predicted / r.measured)) for r in rows if r.predicted]
    held_out = [abs(math.log(r.predicted / r.measured)) for r in rows if r.predicted and not r.fitted]
    return {"rows": len(rows), "max_factor": max(r.factor or math.inf for r in rows),
            "median_abs_log_error": statistics.median(logs) if logs else math.inf,
            "median_abs_log_error_held_out": statistics.median(held_out) if held_out else math.inf}


def markdown_table(rows: list[ValidationRow]) -> str:
    lines = ["| row | metric | devices | predicted | measured | error | fitted |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        pred = "n/a" if r.predicted is None else f"{r.predicted:,.4g}"
        err = "n/a" if r.error is None else f"{r.error:+.0%}"
        lines.append(f"| {r.id} | {r.metric} | {r.devices} | {pred} | {r.measured:,.4g} | {err} | {'yes' if r.fitted else ''} |")
    return "\n".join(lines)
