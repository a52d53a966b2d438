"""Fit the planner's few free constants to the validation rows marked `fitted`, and only to those.

    python -m kvstrata.planner.fit            # print each constant: stored, refitted, the row it comes from
    python -m kvstrata.planner.fit --write    # store the refitted values in data/hardware.json

Each constant is tied to one row (FITS below) and solved so that the planner reproduces that row
exactly (bisection on a log scale; the constants interact, so the solve repeats until they settle).
Every other row is held out: its error is evidence. tests/planner/test_fit.py checks that the stored
constants are what this module finds, so a constant cannot drift from the row it claims to come from.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from kvstrata.planner.catalog import DATA_DIR, hardware_from_dict
from kvstrata.planner.validation import load_rows, predict_row

HARDWARE_JSON = DATA_DIR / "hardware.json"


@dataclass(frozen=True)
class Fit:
    name: str  # how the constant is addressed: section/entry/key
    row: str  # the validation row it is fitted to
    lo: float
    hi: float


FITS = (
    Fit("hardware/cerebras-wse3/per_layer_latency_us", "cerebras-llama3.1-8b", 1.0, 200.0),
    Fit("hardware/groq-lpu/per_layer_latency_us", "groq-llama3.1-8b", 1.0, 400.0),
    Fit("hardware/sambanova-sn40l/per_layer_latency_us", "sambanova-llama3.1-8b", 1.0, 400.0),
    Fit("efficiency_classes/nvidia-gpu/memory", "gptfast-a100-llama2-7b", 0.2, 1.0),
    Fit("efficiency_classes/nvidia-gpu/compute", "trtllm1-h100-llama3.1-8b-prefill-heavy", 0.1, 1.0),
    Fit("efficiency_classes/nvidia-gpu/overlap", "trtllm1-h100-llama3.3-70b", 1.0, 64.0),
    Fit("efficiency_classes/nvidia-gpu/compute_fp4", "trtllm1-b200-llama3.3-70b", 0.05, 1.0),
    Fit("hardware/mi300x/scale_up/latency_us", "amd-mi300x-llama3.1-70b-bs1", 1.0, 200.0),
    Fit("efficiency_classes/amd-gpu/compute", "amd-mi300x-llama3.1-70b-throughput", 0.02, 1.0),
    Fit("efficiency_classes/tpu/memory", "jetstream-v5e8-llama3-8b-bf16", 0.1, 1.0),
    Fit("efficiency_classes/cpu/memory", "llamacpp-epyc9554-phi4-q4km", 0.1, 1.0),
    Fit("spec_profiles/draft-llama-3.2-1b/accepted_tokens_per_step", "nvidia-h200-llama3.3-70b-spec", 1.0, 5.0),
)


def _raw() -> dict[str, Any]:
    return json.loads(HARDWARE_JSON.read_text())


def _get(raw: dict[str, Any], name: str) -> float:
    *path, key = name.split("/")
    for p in path:
        raw = raw[p]
    return float(raw[key])


def _set(raw: dict[str, Any], name: str, value: float) -> None:
    *path, key = name.split("/")
    for p in path:
        raw = raw[p]
    raw[key] = value


def _predictor(raw: dict[str, Any], row: dict[str, Any]) -> Callable[[], float]:
    def predict() -> float:
        classes = raw["efficiency_classes"]
        cat = {n: hardware_from_dict(n, d, classes) for n, d in raw["hardware"].items()}
        profiles = {k: v for k, v in raw["spec_profiles"].items() if not k.startswith("_")}
        pred, _ = predict_row(row, cat, profiles)
        if pred is None:
            raise ValueError(f"row {row['id']} does not fit")
        return pred
    return predict


def _solve(raw: dict[str, Any], fit: Fit, row: dict[str, Any]) -> float:
    """The value in [lo, hi] at which the row's prediction equals its measurement (log bisection)."""
    predict = _predictor(raw, row)

    def gap(v: float) -> float:
        _set(raw, fit.name, v)
        return math.log(predict() / row["measured"])

    lo, hi = fit.lo, fit.hi
    g_lo, g_hi = gap(lo), gap(hi)
    if g_lo * g_hi > 0:  # the row does not depend on this constant enough to reach its measurement
        best = lo if abs(g_lo) < abs(g_hi) else hi
        _set(raw, fit.name, best)
        return best
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        g = gap(mid)
        if (g < 0) == (g_lo < 0):
            lo, g_lo = mid, g
        else:
            hi = mid
    _set(raw, fit.name, math.sqrt(lo * hi))
    return math.sqrt(lo * hi)


def refit(rounds: int = 6) -> dict[str, float]:
    """Fitted value of every constant in FITS, from the stored catalog as the starting point."""
    raw = _raw()
    rows = {r["id"]: r for r in load_rows()["rows"]}
    for f in FITS:
        if not rows[f.row].get("fitted"):
            raise ValueError(f"{f.name} is fitted to {f.row}, which validation.json does not mark fitted")
    for _ in range(rounds):
        for f in FITS:
            _solve(raw, f, rows[f.row])
    return {f.name: _get(raw, f.name) for f in FITS}


def stored() -> dict[str, float]:
    raw = _raw()
    return {f.name: _get(raw, f.name) for f in FITS}


def _round(v: float) -> float:
    return float(f"{v:.3g}")


def write(values: dict[str, float]) -> None:
    """Put the values into hardware.json in place (the file's layout is kept)."""
    text = HARDWARE_JSON.read_text()
    for name, v in values.items():
        *path, key = name.split("/")
        start = 0
        for p in path:
            start = text.index(f'"{p}": {{', start)
        pat = re.compile(rf'("{re.escape(key)}": )([0-9.eE+-]+)')
        m = pat.search(text, start)
        assert m is not None, name
        text = text[:m.start(2)] + repr(_round(v)) + text[m.end(2):]
    json.loads(text)
    HARDWARE_JSON.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="store the refitted constants in data/hardware.json")
    a = ap.parse_args()
    old, new = stored(), refit()
    for f in FITS:
        print(f"{f.name:62s} stored {old[f.name]:8.4g}  refitted {new[f.name]:8.4g}  <- {f.row}")
    if a.write:
        write(new)
        print(f"wrote {HARDWARE_JSON.name}")


if __name__ == "__main__":
    main()
