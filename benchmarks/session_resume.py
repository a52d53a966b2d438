"""Resumed agent turns: time to first token when a session's KV was parked to host or disk between
turns, against the same replay with every turn recomputed.

Multi-turn sessions from the real tau-bench airline trajectories (../shared/data/traces/tau-bench,
recorded user, assistant and tool messages replayed turn by turn; benchmarks/peers/tau_replay.py builds
them). After each turn the session's prompt KV is parked (written to the tier, device copies freed), as
the server's /v1/sessions/{id}/park does while an agent waits on a tool; the next turn, whose history
starts with the previous one, loads it back. Default model, every configuration on the quantization the
server runs (`--quantization auto`: int8 with the native decode step on a CPU) and the same threads, so the
recompute baseline is the server's own prefill. Run: python -m benchmarks.session_resume
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from benchmarks.common import machine, table, write_results
from kvstrata import LLM, SamplingParams
from benchmarks.common import trace_dir


def replay(llm: LLM, sessions, park: str | None) -> list[tuple[int, float, int]]:
    """(context tokens, TTFT s, reused tokens) for every turn."""
    out = []
    for s in sessions:
        for turn in s.turns:
            ids = llm.tokenizer.encode_chat(turn.messages)
            r = llm.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True))[0]
            out.append((len(ids), r.metrics.ttft_s, r.metrics.cached_prompt_tokens))
            if park:
                llm.engine.offload.park(ids, park, pin=False)
    return out


def main() -> None:
    from benchmarks.peers.tau_replay import load_sessions

    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--max-turns", type=int, default=10)
    ap.add_argument("--min-context", type=int, default=2000)
    ap.add_argument("--quantization", default="auto", help="as `kvstrata serve --quantization` (make serve: auto)")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    sessions = load_sessions(trace_dir() / "tau-bench" / "gpt-4o-airline.json", n_sessions=a.sessions,
                             max_chars=30000, max_turns=a.max_turns)
    tmp = tempfile.mkdtemp(prefix="kvstrata-resume-")
    configs = {
        "recompute": dict(enable_prefix_caching=False),
        "host": dict(kv_host_bytes="2G"),
        "disk": dict(kv_disk_dir=os.path.join(tmp, "kv")),
    }
    res, rows = {"machine": machine(), "sessions": a.sessions}, []
    base = None
    for name, kw in configs.items():
        llm = LLM("default", kv_device_bytes="1G", quantization=a.quantization, **kw)
        # an untimed prefill as long as the longest turn (random ids: nothing the turns could reuse), so the first
        # measured turn pays no first-use cost
        n = max(len(llm.tokenizer.encode_chat(t.messages)) for s in sessions for t in s.turns)
        llm.generate([torch.randint(100, 49000, (n,)).tolist()], SamplingParams(max_tokens=2))
        res["quantization"], res["threads"] = llm.engine.config.quantization, torch.get_num_threads()
        turns = replay(llm, sessions, None if name == "recompute" else name)
        long = [t for t in turns if t[0] >= a.min_context]
        resumed = [t for t in long if name == "recompute" or t[2] > 0]
        med = statistics.median(t[1] for t in resumed) if resumed else float("nan")
        reused = sum(t[2] for t in long) / max(1, sum(t[0] for t in long))
        res[name] = {"turns": turns, "median_ttft_long_s": med}
        base = med if name == "recompute" else base
        rows.append([name, len(turns), len(long), med, f"{reused:.0%}", f"{base / med:.1f}x" if base else ""])
        llm.engine.close(flush_device=False)
    md = [f"# Resumed agent turns (tau-bench airline, default model)\n\n{a.sessions} sessions, up to {a.max_turns} "
          f"turns each, {machine()}, quantization {res['quantization']} (`--quantization {a.quantization}`), "
          f"{res['threads']} threads in every configuration. Between turns the session's KV is parked in the tier "
          f"(device copies freed). Command: `python -m benchmarks.session_resume --quantization {a.quantization}`.\n",
          table(["KV between turns", "turns", f"turns with >= {a.min_context} tokens", "median TTFT s (those turns)",
                 "prompt tokens reused", "vs recompute"], rows),
          "\nAim (issue 4): resumed turns at least 10x faster to first token at 2,000+ tokens of context."]
    path = write_results("session_resume", "\n".join(md) + "\n", res)
    print(path.read_text())


if __name__ == "__main__":
    main()
