"""Agentic replay: concurrent agent sessions from the tau-bench airline traces, with tool waits, under a
device KV budget smaller than the sessions' working set. Three ways to hold a waiting agent's KV:

* cost model: SessionKV's placement (`SessionKV.pause` keeps / moves down to host or disk / drops,
  `SessionKV.resume` brings it back and learns the wait); host + disk tiers on;
* recompute: tiers off, the session's KV dropped when it starts waiting (recomputed on every resume);
* keep: tiers off, nothing done at a pause: blocks stay in device memory until the LRU needs the room.

Each session replays its trajectory: at every recorded assistant turn the engine generates (greedy, EOS
ignored) as many tokens as the recorded message had (capped), then the *recorded* message is appended,
so every configuration serves exactly the same prompts. After each assistant turn the session waits:
on its tools after a turn with tool calls, else on the user (tau-bench's user is an LLM simulator,
an external call like a tool; its wait class is named "user"). Waits sweep 1 s .. 5 min (log-spaced, one wait class per tool name, +-20%
jitter) and are SCALED by --time-scale (default 1/100: 10 ms .. 3 s of real sleep) so the run fits in
~10 minutes on 2 cores; the engine learns the scaled durations, so its decisions are made for them.
Every configuration runs the quantization the server runs (`--quantization auto`: int8 with the native
decode step on a CPU) and the same threads, so "vs recompute" is against the server's own prefill.

    python -m benchmarks.agentic_replay [--sessions 8 --steps 8 --kv-device-bytes 256M ...]

Writes benchmarks/results/agentic_replay.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, table, write_results

def default_trace() -> Path:
    from benchmarks.common import trace_dir  # $KVSTRATA_TRACE_DIR, else ../shared/data/traces

    return trace_dir() / "tau-bench" / "gpt-4o-airline.json"


CONFIGS = ("cost-model", "recompute", "keep")


def load_sessions(path: Path, n: int, steps: int, system_chars: int, msg_chars: int) -> list[list[dict]]:
    """The first `n` trajectories (distinct tasks), each cut after its `steps`-th assistant message."""
    data = json.loads(path.read_text())
    seen, out = set(), []
    for r in data:
        if r["task_id"] in seen:
            continue
        seen.add(r["task_id"])
        msgs, k = [], 0
        for m in r["traj"]:
            m = dict(m)
            if isinstance(m.get("content"), str):
                m["content"] = m["content"][: system_chars if m["role"] == "system" else msg_chars]
            msgs.append(m)
            if m["role"] == "assistant":
                k += 1
                if k == steps:
                    break
        out.append(msgs)
        if len(out) == n:
            break
    return out


def wait_classes(sessions: list[list[dict]], lo: float = 1.0, hi: float = 300.0) -> dict[str, float]:
    names = sorted({c["function"]["name"] for s in sessions for m in s for c in m.get("tool_calls") or []} | {"user"})
    if len(names) == 1:
        return {names[0]: math.sqrt(lo * hi)}
    return {nm: lo * (hi / lo) ** (i / (len(names) - 1)) for i, nm in enumerate(names)}


async def replay(aeng, skv, msgs: list[dict], cfg: str, waits: dict[str, float], scale: float, max_gen: int,
                 rng: random.Random, stats: dict) -> None:
    from kvstrata.core import SamplingParams, chain_keys
    from kvstrata.tokenizer.tokenizer import splice_tokens as splice
    from kvstrata.tokenizer.tools import render_chat

    eng = aeng.engine
    tok = eng.tokenizer
    stored: list[int] = []
    paused = None  # the session SessionKV paused (cost-model config)
    i = 0
    while i < len(msgs):
        if msgs[i]["role"] != "assistant":
            i += 1
            continue
        keep, new = splice(tok, stored, render_chat(tok, msgs[:i]))
        prompt = stored[:keep] + new
        target = msgs[i]
        n_gen = max(1, min(max_gen, len(tok.encode(json.dumps(target.get("tool_calls")) if target.get("tool_calls")
                                                   else (target.get("content") or "")))))
        if paused is not None:
            await skv.resume(paused)
        paused = None
        async for _ in aeng.generate(prompt, SamplingParams(max_tokens=n_gen, ignore_eos=True), request_class="batch"):
            pass
        stats["steps"] += 1
        stored = prompt
        calls = target.get("tool_calls") or []
        i += 1
        if not any(m["role"] == "assistant" for m in msgs[i:]):
            continue  # no wait after the last replayed turn: nothing would resume
        # the session now waits on its tools, or on the (LLM-simulated, in tau-bench) user
        name = calls[0]["function"]["name"] if calls else "user"
        if cfg == "cost-model":  # SessionKV places the waiting session's KV (and learns the wait on resume)
            paused = await asyncio.to_thread(skv.store.create_session, owner=None, token_ids=prompt)
            await skv.pause(paused, tool=name)
        elif cfg == "recompute":
            def drop(e, p=prompt):
                for k in chain_keys(p, e.pool.block_size, e.fingerprint):
                    b = e.pool.key_to_block.get(k)
                    if b is not None and e.pool.ref_count[b] == 0:
                        e.pool.drop_cached(b)
            await aeng.call_async(drop)
        w = waits[name] * rng.uniform(0.8, 1.2) * scale
        stats["wait_s"] += w
        await asyncio.sleep(w)


def run_config(cfg: str, sessions, waits, a) -> dict:
    from kvstrata.engine.async_engine import AsyncEngine
    from kvstrata.engine.llm_engine import LLMEngine
    from kvstrata.sessions import open_store
    from kvstrata.sessions.kv import SessionKV

    tmp = Path(tempfile.mkdtemp(prefix="kvstrata-replay-"))
    kw = dict(model=a.model, kv_device_bytes=a.kv_device_bytes, num_threads=a.threads, quantization=a.quantization)
    if cfg == "cost-model":
        kw.update(kv_host_bytes=a.kv_host_bytes, kv_disk_dir=str(tmp / "disk"))
    eng = LLMEngine(**kw)
    aeng = AsyncEngine(eng)
    store = open_store(tmp / "sessions.db")
    skv = SessionKV(aeng, store)
    stats = {"steps": 0, "wait_s": 0.0}

    async def main():
        await asyncio.gather(*(replay(aeng, skv, s, cfg, waits, a.time_scale, a.max_gen, random.Random(j), stats)
                               for j, s in enumerate(sessions)))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    aeng.shutdown()
    store.close()
    c = dict(eng.counters)
    kv = eng.kv_stats()
    bpb = eng.pool.block_bytes if hasattr(eng.pool, "block_bytes") else None
    tiers = {n: {"written": d.get("bytes_written", 0), "read": d.get("bytes_read", 0)}
             for n, d in (kv.get("tiers") or {}).items()}
    out = {"config": cfg, "wall_s": wall, "counters": c, "quantization": eng.config.quantization, "tiers": tiers, "placement": kv.get("placement"),
           "device": kv["device"], "block_bytes": bpb, "engine_offload": kv.get("engine"), **stats}
    eng.close(flush_device=False)
    eng = aeng = None  # freed before the next configuration
    gc.collect()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="assistant turns replayed per session")
    ap.add_argument("--system-chars", type=int, default=1200, help="characters of the shared policy prompt kept")
    ap.add_argument("--msg-chars", type=int, default=800, help="characters kept of each other message")
    ap.add_argument("--max-gen", type=int, default=8, help="most tokens generated per assistant turn")
    ap.add_argument("--time-scale", type=float, default=0.01, help="real seconds per traced second of tool wait")
    ap.add_argument("--kv-device-bytes", default="256M")
    ap.add_argument("--kv-host-bytes", default="2G")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantization", default="auto", help="as `kvstrata serve --quantization` (make serve: auto)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--trace", default=None, help="tau-bench results file (default: the trace folder's)")
    a = ap.parse_args()
    sessions = load_sessions(Path(a.trace) if a.trace else default_trace(), a.sessions, a.steps, a.system_chars, a.msg_chars)
    waits = wait_classes(sessions)
    results = []
    for cfg in a.configs.split(","):
        print(f"== {cfg}", flush=True)
        r = run_config(cfg, sessions, waits, a)
        print(json.dumps({k: r[k] for k in ("wall_s", "counters", "tiers", "wait_s")}, default=str), flush=True)
        results.append(r)
    base = next((r for r in results if r["config"] == "recompute"), None)
    rows = []
    for r in results:
        c = r["counters"]
        served = c["prompt_tokens"] + c["generated_tokens"]
        tput = served / r["wall_s"]
        t = r["tiers"]
        moved = "; ".join(f"{n}: {v['written'] / 2**20:.0f} MiB down, {v['read'] / 2**20:.0f} MiB up" for n, v in t.items()) or "-"
        decisions = (r.get("placement") or {}).get("decisions") or {}
        rows.append([r["config"], round(r["wall_s"], 1), round(tput, 1), round(c["generated_tokens"] / r["wall_s"], 2),
                     round(c["computed_prompt_tokens"] / max(c["prompt_tokens"], 1), 3), moved,
                     json.dumps(decisions) if decisions else "-",
                     f"{tput / (base['counters']['prompt_tokens'] + base['counters']['generated_tokens']) * base['wall_s']:.2f}x" if base else "-"])
    ws = sorted(waits.values())
    md = [
        "# Agentic replay (tau-bench airline)\n",
        f"Machine: {machine()}. Model: {a.model}, quantization {results[0]['quantization']} in every configuration "
        f"(`--quantization {a.quantization}`). {len(sessions)} concurrent sessions, up to {a.steps} assistant turns each "
        f"({sum(r['steps'] for r in results[:1])} steps per configuration), at most {a.max_gen} generated tokens a turn, "
        f"policy prompt cut to {a.system_chars} characters and other messages to {a.msg_chars}.",
        f"Device KV budget {a.kv_device_bytes} (smaller than the working set: see 'device' in the JSON); cost model "
        f"with a {a.kv_host_bytes} host tier and a disk tier.",
        f"Waits after every turn (tools, or the simulated user): {len(waits)} wait classes (one per tool name, plus `user`) log-spaced from {ws[0]:.0f} s to {ws[-1]:.0f} s of "
        f"traced time, +-20% jitter, **scaled by {a.time_scale:g}** (real sleeps {ws[0] * a.time_scale:.2f}..{ws[-1] * a.time_scale:.1f} s) "
        "so the run fits in minutes on 2 cores; the engine learns the scaled waits.\n",
        table(["config", "job completion s", "aggregate tok/s (prompt+gen served)", "generated tok/s",
               "prompt tokens recomputed / served", "bytes moved per tier", "placement decisions", "vs recompute"], rows),
        "\nCommand: `python -m benchmarks.agentic_replay " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                                                                  if v is not None and k != "trace") + "`\n",
    ]
    write_results("agentic_replay", "\n".join(md), {"args": vars(a), "waits": waits, "results": results})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
