"""Speculative decoding by prompt lookup on real agent turns: decode tokens/s with and without, acceptance,
identical greedy output; aggregate tokens/s at 8 and 32 concurrent sequences.

Drafts come from each sequence's own tokens and from the outputs of the turns run before it on the same
engine (`--speculative-shared`); the history is emptied at the start of each workload and of each
concurrent run, so no turn is drafted from an earlier run of its own prompt.

Agent turns, three workloads ($KVSTRATA_TRACE_DIR or ../shared/data/traces): every assistant turn of
tau-bench airline trajectories (the history up to the turn, rendered with the model's chat template, as
benchmarks/peers/tau_replay.py builds it), and the assistant tool-call turns of a BFCL multi-turn session
(GorillaFileSystem entries chained with their ground-truth calls and results, benchmarks/bfcl; the
history rendered with its tools), free and with the call forced (`tool_choice: "required"`: the grammar
of a call of one of its tools, engine/structured.py; drafts are then what the grammar forces, else the
n-gram drafts it allows). Default model on the path every entry point runs
(`--quantization auto`), greedy, stopping at EOS or max_tokens. Two engines, speculation off and on, run
the same turns alternately in one process, so load swings on the machine hit both. Batch 1: decode tokens/s
from the first token to the last (prefill excluded; each prompt's prefix is cached by a one-token warm-up
first). Concurrent: N turns added at once (prefixes cached), aggregate generated tokens / wall time, each
engine run four times in the order off, on, on, off, on, off, off, on and its runs averaged (the machine's
drift cancels).

    python -m benchmarks.speculative [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import machine, table, trace_dir, write_results
from kvstrata import LLM, SamplingParams
from kvstrata.tokenizer.tools import forced_tool_call_spec, render_chat


def turns(n_sessions: int, max_turns: int) -> list[list[dict]]:
    from benchmarks.peers.tau_replay import load_sessions

    sessions = load_sessions(trace_dir() / "tau-bench" / "gpt-4o-airline.json", n_sessions=n_sessions,
                             max_chars=24000, max_turns=max_turns)
    return [t.messages for s in sessions for t in s.turns]


def bfcl_turns(n_turns: int) -> list[tuple[list[dict], list[dict]]]:
    """(history, tools) at each assistant tool-call turn of a BFCL multi-turn session (GorillaFileSystem
    entries chained: the ground-truth calls and our API implementations' results, benchmarks/bfcl)."""
    from benchmarks.bfcl.long_session import replay_session

    system, tools, msgs = replay_session(trace_dir() / "bfcl", n_entries=8)
    msgs = [{"role": "system", "content": system}, *msgs]
    at = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and m.get("tool_calls") and i > 2]
    return [(msgs[:i], tools) for i in at[:n_turns]]


def batch1(engines: dict[str, LLM], prompts: list[tuple[list[int], dict | None]], max_tokens: int) -> dict[str, dict]:
    res = {k: {"tokens": 0, "decode_s": 0.0, "outputs": []} for k in engines}
    for ids, structured in prompts:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, structured=structured)
        for name, llm in engines.items():
            llm.generate([ids], SamplingParams(max_tokens=1, temperature=0))  # the prefix cached
            out = llm.generate([ids], sp)[0]
            m, toks = out.metrics, out.outputs[0].token_ids
            res[name]["outputs"].append(toks)
            if len(toks) > 1:
                res[name]["tokens"] += len(toks) - 1
                res[name]["decode_s"] += m.finished_time - m.first_token_time
    return res


def forget_outputs(llm: LLM) -> None:
    """Empties the engine's history of earlier outputs (drafts may come from it): each measurement starts
    without the outputs of the same prompts run before it."""
    if llm.engine.shared_outputs is not None:
        llm.engine.shared_outputs.clear()


def concurrent(llm: LLM, prompts: list[tuple[list[int], dict | None]], n: int, max_tokens: int) -> tuple[float, list]:
    batch = [prompts[i % len(prompts)][0] for i in range(n)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0, structured=prompts[i % len(prompts)][1])
              for i in range(n)]
    forget_outputs(llm)
    llm.generate(batch, SamplingParams(max_tokens=1, temperature=0))
    t = time.perf_counter()
    outs = llm.generate(batch, params)
    dt = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 sessions, 6 turns each, 12 BFCL turns, 64 tokens")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--max-turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--bfcl-turns", type=int, default=16, help="BFCL assistant tool-call turns")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the native step (1 is steadier on a loaded machine)")
    a = ap.parse_args()
    if a.quick:
        a.sessions, a.max_turns, a.max_tokens, a.bfcl_turns = 2, 6, 64, 12
    torch.set_num_threads(a.threads)
    engines = {k: LLM("default", kv_device_bytes="1G", speculative=k, num_threads=a.threads) for k in ("off", "on")}
    tok = engines["off"].tokenizer
    bfcl = [(tok.encode(render_chat(tok, m, t), add_special_tokens=False), t) for m, t in bfcl_turns(a.bfcl_turns)]
    workloads = {"tau-bench assistant turns": [(tok.encode_chat(m), None) for m in turns(a.sessions, a.max_turns)],
                 "BFCL tool-call turns": [(ids, None) for ids, _ in bfcl],
                 "BFCL tool-call turns, call forced": [(ids, forced_tool_call_spec(t, "required")) for ids, t in bfcl]}
    rows, data = [], {"machine": machine(), "max_tokens": a.max_tokens, "workloads": {}}
    notes = []
    for wname, prompts in workloads.items():
        forget_outputs(engines["on"])
        c0 = dict(engines["on"].engine.counters)
        r = batch1(engines, prompts, a.max_tokens)
        c = engines["on"].engine.counters
        drafted, accepted = c["draft_tokens"] - c0["draft_tokens"], c["accepted_draft_tokens"] - c0["accepted_draft_tokens"]
        tps = {k: v["tokens"] / v["decode_s"] for k, v in r.items()}
        same = r["off"]["outputs"] == r["on"]["outputs"]
        w = {"turns": len(prompts), "prompt_tokens_mean": sum(len(ids) for ids, _ in prompts) / len(prompts), "tok_s": tps,
             "identical_greedy": same, "draft_tokens": drafted, "accepted_draft_tokens": accepted}
        rows.append([f"{wname}: batch 1 decode tok/s", f"{tps['off']:.1f}", f"{tps['on']:.1f}",
                     f"{tps['on'] / tps['off']:.2f}x"])
        for n in (8, 32):
            # off, on, on, off, on, off, off, on (ABBA BAAB): the VM's throughput drifts by 15-20 % over
            # seconds (two engines with speculation off, run one after the other, differed that much; one
            # ABBA round alone left single runs 10 % apart), so each engine's figure is the mean of four
            # runs placed evenly over the measurement
            runs = {"off": [], "on": []}
            for k in ("off", "on", "on", "off", "on", "off", "off", "on"):
                runs[k].append(concurrent(engines[k], prompts, n, a.max_tokens))
            agg = {k: sum(r[0] for r in v) / len(v) for k, v in runs.items()}
            w[f"concurrent_{n}"] = agg
            w[f"concurrent_{n}_runs"] = {k: [r[0] for r in v] for k, v in runs.items()}
            w[f"concurrent_{n}_identical"] = all(r[1] == runs["off"][0][1] for v in runs.values() for r in v)
            rows.append([f"{wname}: {n} concurrent, aggregate tok/s", f"{agg['off']:.1f}", f"{agg['on']:.1f}",
                         f"{agg['on'] / agg['off']:.2f}x"])
        data["workloads"][wname] = w
        notes.append(f"{wname}: {len(prompts)} turns, prompts of {w['prompt_tokens_mean']:.0f} tokens on average; "
                     f"{accepted} of {drafted} draft tokens accepted ({accepted / max(drafted, 1):.0%}); greedy output "
                     f"identical with and without: {same} (batch 1), {w['concurrent_8_identical']} (8), "
                     f"{w['concurrent_32_identical']} (32).")
    data["load_avg"] = os.getloadavg()
    md = (f"# Speculative decoding (prompt lookup) on agent turns\n\n{machine()}, {a.threads} thread(s); "
          f"greedy, up to {a.max_tokens} tokens; load average at the end {os.getloadavg()[0]:.1f}.\n\n"
          + table(["", "off", "on", "on / off"], rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(md)
    write_results("speculative", md, data)


if __name__ == "__main__":
    main()
