"""`make bench`: every benchmark, one after the other, results under benchmarks/results/.

Each benchmark runs as its own process (so one failing does not stop the rest) and writes its own
tables; this script writes benchmarks/results/index.md listing what ran, how long, and what failed.
The llama.cpp peer runs only when `make bench-peers` has built it; otherwise that is said here.
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
    ("peers (llama.cpp, transformers)", ["-m", "benchmarks.peers.run_peers"], "peers_llamacpp.md"),
]


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
