"""Shared benchmark helpers: the machine's ceilings (measured in the same run), timing, peak memory,
result files.

Result files go to benchmarks/results/, or to $KVSTRATA_BENCH_RESULTS (smoke runs that must not replace
the committed results).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KVSTRATA_BENCH_RESULTS") or ROOT / "benchmarks" / "results")


def trace_dir() -> Path:
    """The public traces: $KVSTRATA_TRACE_DIR, else ../shared/data/traces next to the repository."""
    env = os.environ.get("KVSTRATA_TRACE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"


def ceilings(quick: bool = False, redis_url: str | None = None) -> dict:
    """This machine's ceilings, measured now (planner calibration): memory read and copy, fp32 and int8
    matmul, the block checksum (XXH3), disk (and Redis GET with a URL). The planner's engine check reads them from the
    result files (kvstrata.planner.this_engine), so every field of the profile is recorded."""
    from kvstrata.planner.calibration import calibrate

    p = calibrate(quick=quick, redis_url=redis_url)
    keys = ("memory_bw_GBps", "matmul_fp32_GFLOPs", "matmul_int8_GOPs", "host_copy_GBps", "checksum_GBps",
            "disk_read_GBps", "disk_write_GBps", "redis_rtt_ms", "redis_read_GBps")
    return {**{k: getattr(p, k) for k in keys}, "profile": p}


def cpu_info(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ("model name", "flags"), "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


def machine() -> str:
    """Architecture, CPU model (figures from machines that differ only in it are not comparable: the VMs
    these ran on were AMD EPYC and, later, Intel Xeon), cores and Python."""
    model = cpu_info("model name")
    return f"{platform.machine()}{', ' + model if model else ''}, {os.cpu_count()} cores, {platform.python_version()}"


def portable(text: str) -> str:
    """A result as any checkout reads it: this machine's paths (the traces, $KVSTRATA_HOME, the repository,
    the home directory) named by what they are, not where they were."""
    from kvstrata.core import kvstrata_home

    subs = {str(trace_dir().resolve()): "$KVSTRATA_TRACE_DIR", str(kvstrata_home().resolve()): "$KVSTRATA_HOME",
            str(ROOT): ".", str(Path.home()): "~"}
    for path in sorted(subs, key=len, reverse=True):  # the most specific first (the venv inside the repository)
        text = text.replace(path, subs[path])
    return text


def write_results(name: str, markdown: str, data: dict) -> Path:
    """The results as markdown and JSON, both ending with this process's peak RSS (its VmHWM: the engines
    a benchmark builds in itself included; servers it starts are processes of their own)."""
    peak = own_peak_rss_mib()
    data = {**data, "process_peak_rss_mib": peak}
    markdown = markdown.rstrip("\n") + f"\n\nPeak RSS of the benchmark's process (VmHWM): {peak:,.0f} MiB.\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = RESULTS / f"{name}.md"
    md.write_text(portable(markdown))
    (RESULTS / f"{name}.json").write_text(portable(json.dumps(data, indent=1, default=str)))
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


def own_peak_rss_mib() -> float:
    """This process's own peak resident memory (MiB): VmHWM, its own memory only (getrusage's ru_maxrss,
    `peak_rss_mib`, of a process started by vfork + exec, as Python starts one, begins at its parent's
    high-water mark); ru_maxrss off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB), for a benchmark to report beside its results."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM")), None)
    except OSError:
        return None


def wait_peak_rss_mib(proc: subprocess.Popen, timeout: float | None = None) -> float:
    """Waits for a child started with subprocess.Popen and returns its peak resident memory (MiB): the
    kernel's high-water mark of its own memory (VmHWM), polled every 10 ms while it runs (it only
    grows). Not wait4's ru_maxrss: a child started with vfork + exec is charged its parent's high-water
    mark. The Popen object's returncode is set as wait() would (never call poll() / wait() on it first)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    hwm = 0
    while True:
        hwm = max(hwm, _hwm_kib(proc.pid) or 0)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (hwm or usage.ru_maxrss) / 1024
