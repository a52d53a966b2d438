"""Shared benchmark helpers: the machine's ceilings (measured in the same run), timing, result files.

Result files go to benchmarks/results/, or to $KVSTRATA_BENCH_RESULTS (smoke runs that must not replace
the committed results).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(os.environ.get("KVSTRATA_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def ceilings(quick: bool = False) -> dict:
    """Memory bandwidth and fp32 matmul rate of this machine, measured now (planner calibration)."""
    from kvstrata.planner.calibration import calibrate

    p = calibrate(quick=quick)
    return {"memory_bw_GBps": p.memory_bw_GBps, "matmul_fp32_GFLOPs": p.matmul_fp32_GFLOPs,
            "host_copy_GBps": p.host_copy_GBps, "disk_read_GBps": p.disk_read_GBps,
            "disk_write_GBps": p.disk_write_GBps, "profile": p}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


def write_results(name: str, markdown: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = RESULTS / f"{name}.md"
    md.write_text(markdown)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    return md


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0
