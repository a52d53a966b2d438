"""Derive the planner's workload profiles from the public traces, offline, into planner data.

    python -m benchmarks.workload_profiles [--traces DIR] [--check]

Reads the traces under ../shared/data/traces (or $KVSTRATA_TRACE_DIR, or --traces) and writes the
derived numbers, with their provenance (file, bytes, sha256, what was computed), into
src/kvstrata/planner/data/workloads.json. The library reads only that file: it ships no trace
adapters and knows no trace paths. `--check` recomputes and compares instead of writing (the
planner tests run it when the traces are present).

Token counts of text traces (tau-bench, BFCL) are characters / 4 (no tokenizer is loaded); tool
waits absent from a trace are assumptions, stated in the profile's description.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import trace_dir

OUT = Path(__file__).resolve().parents[1] / "src" / "kvstrata" / "planner" / "data" / "workloads.json"
CHARS_PER_TOKEN = 4.0
SCRIPT = "benchmarks/workload_profiles.py"


def _file(root: Path, rel: str) -> dict[str, Any]:
    p = root / rel
    return {"file": rel, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:16]}


def mooncake(root: Path) -> dict[str, Any]:
    seen: set[int] = set()
    reused = total = 0
    ins, outs, ts = [], [], []
    with open(root / "mooncake" / "synthetic_trace.jsonl") as f:
        for line in f:
            r = json.loads(line)
            ins.append(r["input_length"])
            outs.append(r["output_length"])
            ts.append(r["timestamp"])
            for h in r["hash_ids"]:
                reused += h in seen
                total += 1
                seen.add(h)
    reuse, mean_in, span_s = reused / max(total, 1), statistics.fmean(ins), (max(ts) - min(ts)) / 1000.0
    return {"description": f"Mooncake FAST'25 synthetic trace: {len(ins)} requests, mean input {mean_in:.0f}, "
                           f"{reuse:.0%} of 512-token blocks seen earlier in the trace",
            "sessions": 32, "context_tokens": int(mean_in * reuse), "prompt_tokens": int(mean_in * (1 - reuse)),
            "output_tokens": max(1, int(statistics.fmean(outs))), "prefix_reuse": round(reuse, 4),
            "arrival_rate_per_s": round(len(ins) / span_s, 4) if span_s > 0 else None,
            "provenance": {**_file(root, "mooncake/synthetic_trace.jsonl"), "repo": "kvcache-ai/Mooncake FAST25-release/traces",
                           "computed": "mean input/output length; share of hash_ids (512-token blocks) seen earlier; requests / time span"}}


def azure(root: Path, kind: str) -> dict[str, Any]:
    ctx, gen, ts = [], [], []
    rel = f"azure2023/AzureLLMInferenceTrace_{kind}.csv"
    with open(root / rel) as f:
        for row in csv.DictReader(f):
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
            ts.append(datetime.fromisoformat(row["TIMESTAMP"][:26]))
    span_s = (max(ts) - min(ts)).total_seconds()
    return {"description": f"Azure LLM inference trace 2023 ({kind}): {len(ctx)} requests in {span_s / 60:.0f} min, "
                           "no prefix information",
            "sessions": 32, "context_tokens": 0, "prompt_tokens": int(statistics.fmean(ctx)),
            "output_tokens": max(1, int(statistics.fmean(gen))),
            "arrival_rate_per_s": round(len(ctx) / span_s, 4) if span_s > 0 else None,
            "provenance": {**_file(root, rel), "repo": "Azure/AzurePublicDataset (CC-BY-4.0)",
                           "computed": "mean ContextTokens / GeneratedTokens; requests / time span"}}


def _chars(m: dict[str, Any]) -> int:
    n = len(m.get("content") or "")
    for tc in m.get("tool_calls") or []:
        n += len(json.dumps(tc.get("function", tc)))
    return n


def tau_bench(root: Path) -> dict[str, Any]:
    rel = "tau-bench/gpt-4o-airline.json"
    trajs = json.loads((root / rel).read_text())
    turns, out_tok, in_tok, final_ctx, tools = [], [], [], [], []
    for t in trajs:
        msgs = t["traj"]
        n_turns = sum(1 for m in msgs if m["role"] == "assistant")
        turns.append(n_turns)
        tools.append(sum(1 for m in msgs if m["role"] == "tool"))
        out_tok.append(sum(_chars(m) for m in msgs if m["role"] == "assistant") / CHARS_PER_TOKEN / max(n_turns, 1))
        in_tok.append(sum(_chars(m) for m in msgs if m["role"] in ("user", "tool")) / CHARS_PER_TOKEN / max(n_turns, 1))
        final_ctx.append(sum(_chars(m) for m in msgs) / CHARS_PER_TOKEN)
    mean_turns = statistics.fmean(turns)
    return {"description": f"tau-bench airline, {len(trajs)} gpt-4o trajectories: {mean_turns:.1f} assistant turns, "
                           f"{statistics.fmean(tools):.1f} tool calls each; tokens ~ chars/4; tool wait ASSUMED 2 s",
            "sessions": 64, "context_tokens": int(statistics.fmean(final_ctx) / 2),
            "prompt_tokens": int(statistics.fmean(in_tok)), "output_tokens": max(1, int(statistics.fmean(out_tok))),
            "tool_wait_s": 2.0, "turns": round(mean_turns),
            "provenance": {**_file(root, rel), "repo": "sierra-research/tau-bench historical_trajectories (MIT)",
                           "computed": "assistant turns and tool calls per trajectory; characters / 4 per role per turn; "
                                       "context = half the final trajectory"}}


_BFCL_DOCS = {"GorillaFileSystem": "gorilla_file_system", "MathAPI": "math_api", "MessageAPI": "message_api",
              "TwitterAPI": "posting_api", "TicketAPI": "ticket_api", "TradingBot": "trading_bot",
              "TravelAPI": "travel_booking", "VehicleControlAPI": "vehicle_control"}


def bfcl(root: Path) -> dict[str, Any]:
    base = root / "bfcl"
    docs = {c: len((base / "multi_turn_func_doc" / f"{f}.json").read_text()) for c, f in _BFCL_DOCS.items()
            if (base / "multi_turn_func_doc" / f"{f}.json").is_file()}
    entries = [json.loads(x) for x in (base / "BFCL_v4_multi_turn_base.json").read_text().splitlines() if x.strip()]
    answers = {}
    for x in (base / "possible_answer" / "BFCL_v4_multi_turn_base.json").read_text().splitlines():
        if x.strip():
            a = json.loads(x)
            answers[a["id"]] = a.get("ground_truth", [])
    prefix, user, out, turns = [], [], [], []
    for e in entries:
        prefix.append(sum(docs.get(c, 0) for c in e.get("involved_classes", [])) / CHARS_PER_TOKEN)
        n = len(e["question"])
        turns.append(n)
        user.append(sum(len(m.get("content", "")) for turn in e["question"] for m in turn) / CHARS_PER_TOKEN / max(n, 1))
        gt = answers.get(e["id"], [])
        out.append(sum(len(c) for turn in gt for c in turn) / CHARS_PER_TOKEN / max(len(gt), 1))
    return {"description": f"BFCL v4 multi-turn base: {len(entries)} sessions, {statistics.fmean(turns):.1f} turns, "
                           f"{statistics.fmean(prefix):.0f}-token shared tool-doc prefix; tokens ~ chars/4; tool wait ASSUMED 1 s",
            "sessions": 64, "context_tokens": int(statistics.fmean(prefix)), "prompt_tokens": max(1, int(statistics.fmean(user))),
            "output_tokens": max(1, int(statistics.fmean(out))), "tool_wait_s": 1.0, "turns": round(statistics.fmean(turns)),
            "provenance": {**_file(root, "bfcl/BFCL_v4_multi_turn_base.json"), "repo": "ShishirPatil/gorilla BFCL v4 (Apache-2.0)",
                           "computed": "tool-doc characters of the involved classes; user and ground-truth characters per turn; / 4"}}


def _session_requests(trace: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The main session's model calls, then each sub-agent's, as separate sessions (own context each)."""
    main = [r for r in trace["requests"] if r.get("type") != "subagent"]
    subs = [r["requests"] for r in trace["requests"] if r.get("type") == "subagent" and r.get("requests")]
    return [main, *subs]


def claude_code(root: Path) -> dict[str, Any]:
    """Per session: turns, context and uncached tokens per turn (64-token hash blocks seen earlier in the
    same session are cached), output, tool waits (think_time after a tool_use stop) and human waits."""
    files = sorted(glob.glob(str(root / "claude-code" / "trace_*.json")))
    ins, new, outs, tool_wait, human_wait, turns, durations, subagents = [], [], [], [], [], [], [], 0
    for path in files:
        trace = json.loads(Path(path).read_text())
        block = int(trace.get("block_size", 64))
        sessions = _session_requests(trace)
        subagents += len(sessions) - 1
        for reqs in sessions:
            seen: set[int] = set()
            reqs = sorted(reqs, key=lambda r: r["t"])
            turns.append(len(reqs))
            durations.append(reqs[-1]["t"] + reqs[-1].get("api_time", 0.0) - reqs[0]["t"])
            for i, r in enumerate(reqs):
                hit = 0
                for h in r.get("hash_ids", []):
                    if h not in seen:
                        break
                    hit += 1
                seen.update(r.get("hash_ids", []))
                ins.append(r["in"])
                new.append(max(0, r["in"] - hit * block))
                outs.append(r["out"])
                if i + 1 < len(reqs):
                    wait = reqs[i + 1].get("think_time", 0.0)
                    (tool_wait if r.get("stop") == "tool_use" else human_wait).append(wait)
    n_sessions = len(turns)
    hit_rate = 1 - sum(new) / sum(ins)
    return {"description": f"Claude Code sessions (kv-cache-tester traces): {len(files)} recorded sessions plus {subagents} "
                           f"sub-agents = {n_sessions} sessions, {statistics.fmean(turns):.1f} model calls each, mean context "
                           f"{statistics.fmean(ins):,.0f} tokens of which {hit_rate:.0%} is the session's own earlier prefix; "
                           f"tool wait = mean think_time after a tool_use stop; human waits (after end_turn) reported, not used",
            "sessions": 64, "context_tokens": int(statistics.fmean(ins) - statistics.fmean(new)),
            "prompt_tokens": int(statistics.fmean(new)), "output_tokens": max(1, int(statistics.fmean(outs))),
            "tool_wait_s": round(statistics.fmean(tool_wait), 2), "turns": round(statistics.fmean(turns)),
            "prefix_reuse": round(hit_rate, 4),
            "stats": {"sessions": n_sessions, "recorded_sessions": len(files), "subagents": subagents,
                      "turns_median": statistics.median(turns), "context_median": statistics.median(ins),
                      "context_max": max(ins), "uncached_median": statistics.median(new),
                      "output_median": statistics.median(outs), "tool_wait_median_s": statistics.median(tool_wait),
                      "tool_wait_p90_s": statistics.quantiles(tool_wait, n=10)[-1],
                      "human_wait_mean_s": round(statistics.fmean(human_wait), 1) if human_wait else None,
                      "session_duration_median_s": statistics.median(durations)},
            "provenance": {"file": "claude-code/trace_*.json", "files": len(files),
                           "bytes": sum(Path(p).stat().st_size for p in files),
                           "sha256": hashlib.sha256(b"".join(Path(p).read_bytes() for p in files)).hexdigest()[:16],
                           "repo": "callanjfox/kv-cache-tester traces/ (Apache-2.0), commit 94f6046",
                           "computed": "per session (sub-agents separate): model calls; per call: input, uncached input "
                                       "(leading 64-token blocks not seen earlier in the session), output; the wait before "
                                       "the next call split by the stop reason"}}


PROFILES = {"mooncake": mooncake, "azure-conv": lambda r: azure(r, "conv"), "azure-code": lambda r: azure(r, "code"),
            "tau-bench": tau_bench, "bfcl": bfcl, "claude-code": claude_code}


def derive(root: Path) -> dict[str, Any]:
    return {name: fn(root) for name, fn in PROFILES.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=None, help="traces folder (default: $KVSTRATA_TRACE_DIR or ../shared/data/traces)")
    ap.add_argument("--check", action="store_true", help="recompute and compare with the stored file instead of writing")
    a = ap.parse_args()
    root = Path(a.traces) if a.traces else trace_dir()
    profiles = derive(root)
    if a.check:
        stored = json.loads(OUT.read_text())["profiles"]
        bad = [n for n in profiles if {k: v for k, v in profiles[n].items()} != stored.get(n)]
        print("profiles match the traces" if not bad else f"profiles differ from the traces: {bad}")
        return 1 if bad else 0
    doc = {"_about": ["Workload profiles derived offline from public traces by " + SCRIPT + " (run it to refresh).",
                      "Fields are planner Workload fields (means per session turn); provenance names the trace file, "
                      "its size and sha256 prefix and what was computed. The library reads only this file."],
           "profiles": profiles}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(Path.cwd()) if OUT.is_relative_to(Path.cwd()) else OUT.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
