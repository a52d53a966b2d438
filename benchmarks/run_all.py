"""`make bench`: every benchmark, one after the other, results under benchmarks/results/.

Each benchmark runs as its own process (so one failing does not stop the rest) and writes its own
tables; this script writes benchmarks/results/index.md listing what ran, how long, and what failed.
The side-by-side peer benchmark (kvstrata beside llama.cpp and transformers, benchmarks/peers) runs
only when `make bench-peers` has built llama.cpp; otherwise it is skipped and the index and the console
say so, with the command to run. The agent replay (benchmarks/agent_replay) runs its kvstrata peers either
way and marks llama-server skipped in its own results when it is not built.

    python -m benchmarks.run_all [--quick] [NAME ...]   # NAME: part of a benchmark's name, e.g. "agent replay"

`--quick` passes `--quick` to the benchmarks that have a short form (engine, peers, agent replay).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

BENCHES = [
    ("start-up (cold start, server ready, restart, peak RSS; beside llama.cpp when built)", ["-m", "benchmarks.startup"],
     "startup.md"),
    ("engine", ["-m", "benchmarks.engine_bench"], "engine.md"),
    ("speculative decoding (prompt lookup) on agent turns", ["-m", "benchmarks.speculative"], "speculative.md"),
    ("sampled decoding (the sampler beside torch ops; sampled against greedy tok/s)", ["-m", "benchmarks.sampling"],
     "sampling.md"),
    ("tier TTFT", ["-m", "benchmarks.tier_ttft"], "tier_ttft.md"),
    ("int8 KV codec effect on output", ["-m", "benchmarks.kv_codec_effect"], "kv_codec_effect.md"),
    ("tier bandwidth", ["-m", "benchmarks.tier_bandwidth"], "tier_bandwidth.md"),
    ("mooncake cache simulation", ["-m", "benchmarks.mooncake_sim"], "mooncake_sim.md"),
    ("resumed agent turns", ["-m", "benchmarks.session_resume"], "session_resume.md"),
    ("serving (HTTP)", ["-m", "benchmarks.serving"], "serving.md"),
    ("agentic replay", ["-m", "benchmarks.agentic_replay"], "agentic_replay.md"),
    ("agent replay (Claude Code traces: kvstrata vs llama-server vs recompute)", ["-m", "benchmarks.agent_replay"],
     "agent_replay.md"),
    ("cluster: Claude Code replay (Ray Serve)", ["-m", "benchmarks.cluster_replay"], "cluster_replay.md"),
    ("cluster: prefill/decode disaggregation", ["-m", "benchmarks.cluster_pd"], "cluster_pd.md"),
    ("memory: embedding model", ["-m", "benchmarks.memory_embed"], "memory_embed.md"),
    ("memory: compaction on a long session", ["-m", "benchmarks.memory_compaction"], "memory_compaction.md"),
    ("peers side by side (kvstrata, llama.cpp, transformers)", ["-m", "benchmarks.peers.run_peers"], "peers.md"),
]
QUICK = {"benchmarks.engine_bench", "benchmarks.speculative", "benchmarks.sampling", "benchmarks.agent_replay", "benchmarks.peers.run_peers"}  # take --quick


def present(module: str) -> bool:
    """The benchmark's module (a file or a package) is in this checkout."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def peer_missing() -> str:
    """Why the llama.cpp peer cannot run ("" when it is built)."""
    try:
        from benchmarks.peers.common import peers_available
    except ImportError as exc:  # kvstrata not importable: the benchmark itself would fail the same way
        return f"cannot check the llama.cpp peer ({exc})"
    ok, why = peers_available()
    return "" if ok else why


PEAK_NOTE = ("Peak RSS: the largest resident set of any one process of the benchmark (itself, or a server or "
             "peer it started and waited for), as the kernel reports it when the benchmark exits (wait4's "
             "ru_maxrss). A process started by vfork + exec, as Python starts one, is charged the high-water mark "
             "its parent had then, so this is an upper bound; each result file gives its own process's peak, and the "
             "benchmarks that start servers give theirs.")


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[int, float]:
    """Runs one benchmark: (its exit code, the peak RSS in MiB of the largest process of its tree)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        _, status, usage = os.wait4(p.pid, 0)
    except BaseException:
        p.kill()
        p.wait()
        raise
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 1024  # (KiB on Linux)


def main() -> int:
    ap = argparse.ArgumentParser(description="run every benchmark; results under benchmarks/results/")
    ap.add_argument("names", nargs="*", help="run only the benchmarks whose name contains one of these")
    ap.add_argument("--quick", action="store_true", help="the short form of the benchmarks that have one")
    a = ap.parse_args()
    only = set(a.names)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}"}
    lines = ["# Benchmark index\n", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores.\n",
             "| benchmark | result file | seconds | peak RSS, MiB | status |", "|---|---|---|---|---|"]
    failed = 0
    for name, args, out in BENCHES:
        if only and not any(o in name for o in only):
            continue
        if not present(args[1]):
            lines.append(f"| {name} | - | - | - | not present in this checkout |")
            continue
        if args[1] == "benchmarks.peers.run_peers" and (why := peer_missing()):
            msg = (f"skipped: llama.cpp peer not built; run `make bench-peers`, then `make bench` "
                   f"(this part alone: `python -m benchmarks.run_all peers`) ({why})")
            print(f"== {name}: {msg}", flush=True)
            lines.append(f"| {name} | - | - | - | {msg} |")
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        quick = a.quick and args[1] in QUICK
        if quick and args[1] == "benchmarks.agent_replay":
            out = "agent_replay_quick.md"
        rc, peak = run_child([sys.executable, *args, *(["--quick"] if quick else [])], env)
        dt = time.time() - t0
        status = "ok" if rc == 0 else f"failed (exit {rc})"
        failed += rc != 0
        lines.append(f"| {name} | [{out}]({out}) | {dt:.0f} | {peak:,.0f} | {status} |")
    lines.append(f"\n{PEAK_NOTE}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
