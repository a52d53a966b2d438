"""Compaction's cost and effect, on a long agent session replayed from the BFCL multi-turn traces (their
ground-truth calls run against our API implementations; benchmarks/bfcl/long_session.py), which outgrows
the default model's window. Two ways to carry on past the window, in the same process and run:

- compaction: a durable session (sessions/turns.py); when the next prompt would not fit, the model
  summarises the older turns (memory/compaction.py) and the compacted prefix's KV is computed once and
  reused by the following turns;
- truncation: what a stateless client does: each turn sends the system prompt, the tools and the latest
  messages that fit, so the prompt's start moves as the window slides and its KV is recomputed.

Each assistant turn generates as many tokens as the recorded message has (ignore_eos), then the recorded
message is what the conversation keeps, so both runs see identical inputs. Reported: wall time, prompt
tokens computed vs served from the cache, and per compaction its seconds and the prompt tokens it saved
every later turn (its tokens before minus after).

    python -m benchmarks.memory_compaction [--entries 12 --window 8192 --quantization auto]

Needs the BFCL traces ($KVSTRATA_TRACES/bfcl or shared/data/traces/bfcl beside the checkout).
Writes benchmarks/results/memory_compaction.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

from benchmarks.bfcl.jobfile import find_data_dir
from benchmarks.bfcl.long_session import replay_session
from benchmarks.common import machine, table, write_results


def turns_of(msgs: list[dict]) -> list[tuple[list[dict], dict]]:
    """(input messages since the previous assistant message, the recorded assistant message) per turn."""
    out, pending = [], []
    for m in msgs:
        if m["role"] == "assistant":
            out.append((pending, m))
            pending = []
        else:
            pending.append(m)
    return out


def out_tokens(tok, msg: dict) -> int:
    import json

    text = (msg.get("content") or "") + "".join(json.dumps(c["function"]) for c in msg.get("tool_calls") or [])
    return max(4, len(tok.encode(text, add_special_tokens=False)))


async def gen(aeng, prompt, n, rid):
    from kvstrata.core import SamplingParams

    final = None
    async for o in aeng.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0),
                                 request_id=rid, request_class="batch"):
        final = o
    return final


async def run_compaction(aeng, store, system, tools, turns, window, keep_recent) -> dict:
    from kvstrata.core import SamplingParams
    from kvstrata.memory import CompactionPolicy, maybe_compact
    from kvstrata.memory.compaction import default_threshold
    from kvstrata.sessions import ANY_OWNER, turns as st
    from kvstrata.sessions.kv import SessionKV
    from kvstrata.sessions.types import SessionState
    from kvstrata.tokenizer.tokenizer import splice_tokens
    from kvstrata.tokenizer.tools import render_chat

    e, tok = aeng.engine, aeng.engine.tokenizer
    skv = SessionKV(aeng, store)
    sess = await asyncio.to_thread(store.create_session, owner=None, system_prompt=system, tools=tools)
    comps, computed, cached, t0 = [], 0, 0, time.perf_counter()
    for i, (new, rec) in enumerate(turns):
        n = out_tokens(tok, rec)
        plan = st.plan_turn(e, sess, new, lambda k: SamplingParams(max_tokens=n))
        policy = CompactionPolicy(keep_recent_tokens=keep_recent)
        policy = dataclasses.replace(policy, threshold_tokens=default_threshold(policy, window, n))
        if len(plan.prompt) + n > policy.threshold_tokens:
            if new:  # the turn's inputs join the log first, so the summary and the kept turns include them
                await st.append(store, sess, ANY_OWNER, new, None)
                new = []
            res = await maybe_compact(aeng, store, skv, sess, ANY_OWNER, policy, len(plan.prompt) + n)
            if res is not None:
                comps.append({"turn": i, "seconds": res["seconds"], "tokens_before": res["tokens_before"],
                              "tokens_after": res["tokens_after"], "summary_tokens": res["summary_tokens"],
                              "summary_cached_tokens": res["summary_cached_tokens"]})
            plan = st.plan_turn(e, sess, new, lambda k: SamplingParams(max_tokens=n))
            if len(plan.prompt) + n > window:
                raise SystemExit(f"turn {i}: compaction could not bring the prompt under the window "
                                 f"({len(plan.prompt)} + {n} > {window}); lower --keep-recent or raise --window")
        out = await gen(aeng, plan.prompt, n, f"c{i}")
        computed += out.metrics.computed_prompt_tokens
        cached += out.metrics.cached_prompt_tokens
        # the conversation keeps the recorded message: its tokens spliced after the prompt
        full = render_chat(tok, st.history(sess) + new + [rec], tools=tools, tool_choice="auto", add_generation_prompt=False)
        keep, ids = splice_tokens(tok, plan.prompt, full)
        if keep < len(plan.prompt):  # the template renders the generation prompt otherwise: cut there
            plan = dataclasses.replace(plan, prompt=plan.prompt[:keep], keep=min(plan.keep, keep),
                                       new_ids=plan.prompt[min(plan.keep, keep):keep])
        await st.record_turn(store, e, sess, ANY_OWNER, new, plan, rec, ids, SessionState.ACTIVE)
    return {"wall_s": time.perf_counter() - t0, "computed_prompt_tokens": computed, "cached_prompt_tokens": cached,
            "compactions": comps}


async def run_truncation(aeng, system, tools, turns, window) -> dict:
    from kvstrata.tokenizer.tools import render_chat

    tok = aeng.engine.tokenizer
    hist: list[dict] = []
    computed, cached, t0, dropped = 0, 0, time.perf_counter(), 0
    for i, (new, rec) in enumerate(turns):
        n = out_tokens(tok, rec)
        hist += new
        start = 0
        while True:
            text = render_chat(tok, [{"role": "system", "content": system}] + hist[start:], tools=tools, tool_choice="auto")
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) + n <= window - 8 or start >= len(hist) - 1:
                break
            start += 1
            while start < len(hist) - 1 and hist[start]["role"] != "user":  # never open on a tool result
                start += 1
        dropped = max(dropped, start)
        out = await gen(aeng, ids, n, f"t{i}")
        computed += out.metrics.computed_prompt_tokens
        cached += out.metrics.cached_prompt_tokens
        hist.append(rec)
    return {"wall_s": time.perf_counter() - t0, "computed_prompt_tokens": computed, "cached_prompt_tokens": cached,
            "messages_dropped_at_end": dropped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=12, help="BFCL entries chained into the session")
    ap.add_argument("--window", type=int, default=8192, help="max_model_len (the default model's is 8192)")
    ap.add_argument("--keep-recent", type=int, default=None, help="compaction's keep_recent_tokens (default: its own)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--kv-device-bytes", default="512M")
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    from kvstrata.engine.async_engine import AsyncEngine
    from kvstrata.engine.llm_engine import LLMEngine
    from kvstrata.sessions import open_store

    system, tools, msgs = replay_session(find_data_dir(a.data_dir), a.entries)
    turns = turns_of(msgs)
    res = {}
    with tempfile.TemporaryDirectory(prefix="kvstrata-mc-") as tmp:
        for mode in ("compaction", "truncation"):  # a fresh engine each: no KV carried between the runs
            aeng = AsyncEngine(LLMEngine(model=a.model, quantization=a.quantization, kv_device_bytes=a.kv_device_bytes,
                                         max_model_len=a.window))
            store = open_store(Path(tmp) / f"{mode}.db")
            try:
                if mode == "compaction":
                    res[mode] = asyncio.run(run_compaction(aeng, store, system, tools, turns, a.window, a.keep_recent))
                else:
                    res[mode] = asyncio.run(run_truncation(aeng, system, tools, turns, a.window))
            finally:
                store.close()
                aeng.shutdown()
            print(mode, {k: v for k, v in res[mode].items() if k != "compactions"}, flush=True)
    c, t = res["compaction"], res["truncation"]
    comps = c["compactions"]
    rows = [[m, r["wall_s"], r["computed_prompt_tokens"], r["cached_prompt_tokens"]] for m, r in res.items()]
    crow = [[x["turn"], x["seconds"], x["tokens_before"], x["tokens_after"], x["tokens_before"] - x["tokens_after"],
             x["summary_cached_tokens"]] for x in comps]
    md = ["# Compaction on a long replayed agent session\n",
          f"{machine()}; {a.entries} BFCL entries chained ({len(turns)} assistant turns, {len(msgs)} messages), "
          f"model {a.model} ({a.quantization}), window {a.window} tokens. The machine was shared with other "
          "work while this ran; the ratio is measured in the same run.\n",
          table(["mode", "wall s", "prompt tokens computed", "prompt tokens cached"], rows),
          f"\nCompaction vs truncation: **{t['wall_s'] / c['wall_s']:.2f}x** faster end to end, "
          f"{t['computed_prompt_tokens'] / max(1, c['computed_prompt_tokens']):.2f}x fewer prompt tokens computed.\n",
          "## Each compaction\n",
          table(["at turn", "seconds", "tokens before", "tokens after", "saved per later turn", "summary prompt cached"], crow)
          if crow else "(none: the session fit the window)"]
    path = write_results("memory_compaction", "\n".join(md),
                         {"machine": machine(), "args": vars(a), "turns": len(turns), "results": res})
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
