"""What batch invariance costs: this checkout's engine against an earlier commit's, in one process.

The earlier commit's package is exported with `git archive` into a temporary directory and imported
under another name (`kvstrata_before`), so both engines run the same workloads alternately, A B B A,
on the same machine state: on this shared VM memory bandwidth swings minute to minute and other
tenants' load comes and goes, so runs minutes apart are not comparable. By default each measurement
is CPU time of the process on one thread (time.process_time), which other tenants' load inflates far
less than wall time; `--threads 2 --wall` measures wall time on two threads instead.

Workloads (default model, random prompt tokens): prefill of n tokens (one request, max_tokens=1) and
decode of B sequences at a context of c tokens (prefill excluded). Prints a markdown table.

Run: python -m benchmarks.invariance_cost --before 8428546 --quantization int8 [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def export_before(rev: str, into: Path) -> None:
    """The package as of `rev`, renamed kvstrata_before (its own imports rewritten)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/kvstrata"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    pkg = into / "kvstrata_before"
    (into / "src" / "kvstrata").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bkvstrata(?=[. ])", "kvstrata_before", f.read_text()))


def rand_ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def prefill(llm, sp, g, clock, n: int) -> float:
    eng = llm.engine
    eng.pool.reset_prefix_cache()
    eng.add_request(rand_ids(g, n), sp(max_tokens=1))
    t = clock()
    eng.run_to_completion()
    return n / (clock() - t)


def decode(llm, sp, g, clock, batch: int, ctx: int, new: int = 16) -> float:
    eng = llm.engine
    eng.pool.reset_prefix_cache()
    for _ in range(batch):
        eng.add_request(rand_ids(g, ctx), sp(max_tokens=new, ignore_eos=True))
    while any(s.in_prefill for s in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()
    start, t = eng.counters["generated_tokens"], clock()
    eng.run_to_completion()
    return (eng.counters["generated_tokens"] - start) / (clock() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the git revision to compare with")
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="wall time instead of process CPU time")
    ap.add_argument("--cases", default="p512,p2048,p4096,d1x512,d1x2048,d8x512,d64x256",
                    help="pN: prefill of N tokens; dBxC: decode of B sequences at context C")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.wall else time.process_time
    tmp = tempfile.TemporaryDirectory()
    export_before(a.before, Path(tmp.name))
    sys.path.insert(0, tmp.name)
    engines = {}
    for name, mod in (("before", "kvstrata_before"), ("after", "kvstrata")):
        pkg = importlib.import_module(mod)
        llm = importlib.import_module(f"{mod}.engine.llm").LLM
        engines[name] = (llm("default", kv_device_bytes="1G", quantization=a.quantization, num_threads=a.threads),
                         pkg.SamplingParams)
    g = torch.Generator().manual_seed(0)
    results: dict[str, dict[str, list[float]]] = {}
    for rep in range(a.reps):
        for case in a.cases.split(","):
            order = list(engines.items()) if rep % 2 == 0 else list(reversed(engines.items()))
            for name, (llm, sp) in order:
                if case[0] == "p":
                    v = prefill(llm, sp, g, clock, int(case[1:]))
                else:
                    b, c = (int(x) for x in case[1:].split("x"))
                    v = decode(llm, sp, g, clock, b, c)
                results.setdefault(case, {}).setdefault(name, []).append(v)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    unit = "wall" if a.wall else "CPU"
    print(f"\n{a.quantization}, {a.threads} thread(s), {unit} time, median of {a.reps}, before = {a.before}\n")
    print("| workload | before tok/s | after tok/s | after / before |\n|---|---:|---:|---:|")
    for case, d in results.items():
        what = f"prefill {case[1:]}" if case[0] == "p" else "decode batch {} at {}".format(*case[1:].split("x"))
        print(f"| {what} | {med(d['before']):.1f} | {med(d['after']):.1f} | {med(d['after']) / med(d['before']):.2f} |")


if __name__ == "__main__":
    main()
