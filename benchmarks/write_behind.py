"""What durability by default costs: decode throughput with write-behind (every full block written to the
disk tier as it fills) against write-on-evict (nothing written while the pool has room), same engine
flags as `make serve` otherwise, alternating the two in one process so both see the same machine state;
and the window after a request's last token until all its blocks are on disk.

    python -m benchmarks.write_behind [--streams 8 --prompt 512 --new 128 --reps 3]

Writes benchmarks/results/write_behind.md and .json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, table, write_results


def run_once(policy: str, a, rep: int) -> dict:
    from kvstrata.core import SamplingParams
    from kvstrata.engine.llm_engine import LLMEngine

    tmp = Path(tempfile.mkdtemp(prefix="kvstrata-wb-"))
    eng = LLMEngine(model=a.model, quantization="auto", kv_device_bytes=a.kv_device_bytes,
                    kv_disk_dir=str(tmp / "kv"), kv_write_policy=policy)
    try:
        words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta"]
        for i in range(a.streams):  # distinct prompts (nothing shared between streams or repetitions)
            text = " ".join(f"{words[(i * 7 + j * 3 + rep) % 8]}{j % 97}" for j in range(a.prompt))
            ids = eng.tokenizer.encode(text)[: a.prompt]
            eng.add_request(ids, SamplingParams(max_tokens=a.new, ignore_eos=True, temperature=0.0), f"r{i}")
        t0 = time.perf_counter()
        while any(s.in_prefill for s in eng.scheduler.running + list(eng.scheduler.waiting)):
            eng.step()
        t1, n1, c1 = time.perf_counter(), eng.counters["generated_tokens"], time.process_time()
        eng.run_to_completion()
        t2, c2 = time.perf_counter(), time.process_time()
        eng.offload.stack.flush()  # the window: last token -> every block on disk
        t3 = time.perf_counter()
        st = eng.offload.stats()
        n = eng.counters["generated_tokens"] - n1
        return {"policy": policy, "prefill_s": t1 - t0, "decode_tok_s": n / (t2 - t1), "cpu_ms_per_token": 1e3 * (c2 - c1) / n,
                "drain_after_last_token_s": t3 - t2, "blocks_written_behind": st["engine"]["blocks_written_behind"],
                "write_behind_dropped": st["engine"]["write_behind_dropped"]}
    finally:
        eng.close(flush_device=False)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-device-bytes", default="512M")
    a = ap.parse_args()
    runs = []
    for rep in range(a.reps):  # alternating: both policies see the VM's same bandwidth phases
        for policy in ("write-on-evict", "write-behind") if rep % 2 == 0 else ("write-behind", "write-on-evict"):
            r = run_once(policy, a, rep)
            print(r, flush=True)
            runs.append(r)
    keys = ("prefill_s", "decode_tok_s", "cpu_ms_per_token", "drain_after_last_token_s", "blocks_written_behind")
    med = {p: {k: statistics.median(r[k] for r in runs if r["policy"] == p) for k in keys}
           for p in ("write-on-evict", "write-behind")}
    # the least disturbed repetition of each policy: on a shared VM a repetition that overlaps other tenants' work
    # decodes several times slower (OpenMP threads spinning on busy cores), whatever the policy
    best = {p: {"decode_tok_s": max(r["decode_tok_s"] for r in runs if r["policy"] == p),
                "cpu_ms_per_token": min(r["cpu_ms_per_token"] for r in runs if r["policy"] == p)}
            for p in ("write-on-evict", "write-behind")}
    wb, we = best["write-behind"], best["write-on-evict"]
    rows = [[p, best[p]["decode_tok_s"], best[p]["cpu_ms_per_token"], m["decode_tok_s"], m["cpu_ms_per_token"],
             m["prefill_s"], m["blocks_written_behind"], m["drain_after_last_token_s"]] for p, m in med.items()]
    cost = 1 - wb["decode_tok_s"] / we["decode_tok_s"]
    cpu_cost = wb["cpu_ms_per_token"] / we["cpu_ms_per_token"] - 1
    md = [f"# Write-behind: the cost of durability by default\n\nMachine: {machine()}. Model {a.model} "
          f"(--quantization auto), {a.streams} streams of {a.prompt}-token distinct prompts, {a.new} new tokens each, "
          f"disk tier only, medians of {a.reps} alternating repetitions.\n",
          table(["policy", "best decode tok/s (aggregate)", "best CPU ms / token", "median decode tok/s",
                 "median CPU ms / token", "prefill s", "blocks written behind", "s after the last token "
                 "until every block is on disk"], rows),
          f"\nDecode cost of write-behind, least disturbed repetitions: **{cost:.1%}** of throughput, **{cpu_cost:.1%}** "
          "more process CPU time per decoded token (the mover's encoding and writes) (aim < 5%). On a shared VM a "
          "repetition that overlaps other work decodes several times slower whatever the policy, so medians of a few "
          "repetitions compare noise; every repetition is in the JSON.\n",
          "Command: `python -m benchmarks.write_behind " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()) + "`\n"]
    write_results("write_behind", "\n".join(md), {"args": vars(a), "runs": runs, "medians": med, "best": best,
                                                   "decode_cost": cost, "cpu_cost": cpu_cost})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
