"""`make bench`: every benchmark, one after the other, results under benchmarks/results/.

Each benchmark runs as its own process (so one failing does not stop the rest) and writes its own
tables; this script writes benchmarks/results/index.md listing what ran, how long, and what failed.
The side-by-side peer benchmark (kvstrata beside llama.cpp and transformers, benchmarks/peers) runs
only when `make bench-peers` has built llama.cpp; otherwise it is skipped and the index and the console
say so, with the command to run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

BENCHES = [
    ("engine", ["-m", "benchmarks.engine_bench"], "engine.md"),
    ("tier TTFT", ["-m", "benchmarks.tier_ttft"], "tier_ttft.md"),
    ("int8 KV codec effect on output", ["-m", "benchmarks.kv_codec_effect"], "kv_codec_effect.md"),
    ("tier bandwidth", ["-m", "benchmarks.tier_bandwidth"], "tier_bandwidth.md"),
    ("mooncake cache simulation", ["-m", "benchmarks.mooncake_sim"], "mooncake_sim.md"),
    ("resumed agent turns", ["-m", "benchmarks.session_resume"], "session_resume.md"),
    ("serving (HTTP)", ["-m", "benchmarks.serving"], "serving.md"),
    ("agentic replay", ["-m", "benchmarks.agentic_replay"], "agentic_replay.md"),
    ("memory: embedding model", ["-m", "benchmarks.memory_embed"], "memory_embed.md"),
    ("memory: compaction on a long session", ["-m", "benchmarks.memory_compaction"], "memory_compaction.md"),
    ("peers side by side (kvstrata, llama.cpp, transformers)", ["-m", "benchmarks.peers.run_peers"], "peers.md"),
]


def peer_missing() -> str:
    """Why the llama.cpp peer cannot run ("" when it is built)."""
    try:
        from benchmarks.peers.common import peers_available
    except ImportError as exc:  # kvstrata not importable: the benchmark itself would fail the same way
        return f"cannot check the llama.cpp peer ({exc})"
    ok, why = peers_available()
    return "" if ok else why


def main() -> int:
    only = set(sys.argv[1:])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}"}
    lines = ["# Benchmark index\n", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores.\n",
             "| benchmark | result file | seconds | status |", "|---|---|---|---|"]
    failed = 0
    for name, args, out in BENCHES:
        if only and not any(o in name for o in only):
            continue
        if not (ROOT / "benchmarks" / (args[1].split(".")[-1] + ".py")).exists() and "peers" not in args[1]:
            lines.append(f"| {name} | - | - | not present in this checkout |")
            continue
        if "peers" in args[1] and (why := peer_missing()):
            msg = (f"skipped: llama.cpp peer not built; run `make bench-peers`, then `make bench` "
                   f"(this part alone: `python -m benchmarks.run_all peers`) ({why})")
            print(f"== {name}: {msg}", flush=True)
            lines.append(f"| {name} | - | - | {msg} |")
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
        dt = time.time() - t0
        status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        failed += p.returncode != 0
        lines.append(f"| {name} | [{out}]({out}) | {dt:.0f} | {status} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
