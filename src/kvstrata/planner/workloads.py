"""Workloads: what the machine is asked to carry.

`answer`  : one person waiting on a short prompt; what counts is time to first token and tokens/s.
`agentic` : many sessions with long contexts, each turn followed by a tool wait; what counts is how
            many sessions a machine holds, what a turn costs, and what a million tokens cost.
Profiles derived from the public traces in ../shared/data/traces (read-only): Mooncake (FAST'25
synthetic trace, 512-token prefix-hash blocks), Azure LLM inference 2023 (conversation, code),
tau-bench airline trajectories, BFCL v4 multi-turn. Token counts of text traces (tau-bench, BFCL)
are estimated as characters / 4 (the usual English rule of thumb; no tokenizer is loaded).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class Workload:
    """One kind of traffic. Token counts are means per session turn."""

    name: str
    description: str
    sessions: int  # sessions alive at once (a person each for `answer`, agents for `agentic`)
    context_tokens: int  # tokens already in the session's KV when a turn starts
    prompt_tokens: int  # new tokens to prefill per turn (user message, tool result)
    output_tokens: int  # tokens generated per turn
    tool_wait_s: float = 0.0  # mean pause after a turn (tool call, human); 0 = none
    turns: int = 1
    prefix_reuse: float = 0.0  # fraction of prompt tokens found in a cache (trace-derived)
    arrival_rate_per_s: float | None = None  # requests per second in the source trace, if any
    source: str = "built-in"

    def __post_init__(self) -> None:
        if self.sessions < 1:
            raise KvstrataError(f"workload {self.name!r}: sessions must be >= 1, got {self.sessions}")
        if min(self.context_tokens, self.prompt_tokens) < 0 or self.output_tokens < 1:
            raise KvstrataError(f"workload {self.name!r}: token counts must be >= 0 (output >= 1)")
        if self.tool_wait_s < 0 or not 0.0 <= self.prefix_reuse <= 1.0:
            raise KvstrataError(f"workload {self.name!r}: tool_wait_s >= 0 and prefix_reuse in [0, 1] required")

    @property
    def peak_context(self) -> int:
        """Tokens a session holds at the end of a turn."""
        return self.context_tokens + self.prompt_tokens + self.output_tokens

    @property
    def decode_context(self) -> int:
        """Mean context seen by decode steps during a turn."""
        return self.context_tokens + self.prompt_tokens + self.output_tokens // 2

    def with_overrides(self, **kw: Any) -> "Workload":
        kw = {k: v for k, v in kw.items() if v is not None}
        return replace(self, **kw) if kw else self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BUILTIN: dict[str, Workload] = {
    "answer": Workload("answer", "one person waiting: short prompt, a few hundred tokens out", sessions=1,
                       context_tokens=0, prompt_tokens=1000, output_tokens=500),
    "agentic": Workload("agentic", "many agents: long contexts, a tool wait after every turn", sessions=64,
                        context_tokens=32000, prompt_tokens=2000, output_tokens=400, tool_wait_s=15.0, turns=20),
}


def trace_dir() -> Path:
    """$KVSTRATA_TRACE_DIR, else ../shared/data/traces next to the repository."""
    env = os.environ.get("KVSTRATA_TRACE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "traces"


def _mooncake(root: Path) -> Workload:
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
    reuse = reused / max(total, 1)
    mean_in = statistics.fmean(ins)
    span_s = (max(ts) - min(ts)) / 1000.0
    return Workload("mooncake", f"Mooncake FAST'25 synthetic trace: {len(ins)} requests, mean input {mean_in:.0f}, "
                    f"{reuse:.0%} of 512-token blocks seen before", sessions=32,
                    context_tokens=int(mean_in * reuse), prompt_tokens=int(mean_in * (1 - reuse)),
                    output_tokens=max(1, int(statistics.fmean(outs))), prefix_reuse=reuse,
                    arrival_rate_per_s=len(ins) / span_s if span_s > 0 else None,
                    source="kvcache-ai/Mooncake FAST25-release/traces/synthetic_trace.jsonl")


def _azure(root: Path, kind: str) -> Workload:
    ctx, gen, ts = [], [], []
    with open(root / "azure2023" / f"AzureLLMInferenceTrace_{kind}.csv") as f:
        for row in csv.DictReader(f):
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
            ts.append(datetime.fromisoformat(row["TIMESTAMP"][:26]))
    span_s = (max(ts) - min(ts)).total_seconds()
    return Workload(f"azure-{kind}", f"Azure LLM inference trace 2023 ({kind}): {len(ctx)} requests in "
                    f"{span_s / 60:.0f} min, no prefix information", sessions=32, context_tokens=0,
                    prompt_tokens=int(statistics.fmean(ctx)), output_tokens=max(1, int(statistics.fmean(gen))),
                    arrival_rate_per_s=len(ctx) / span_s if span_s > 0 else None,
                    source=f"Azure/AzurePublicDataset data/AzureLLMInferenceTrace_{kind}.csv (CC-BY-4.0)")


def _chars(m: dict[str, Any]) -> int:
    n = len(m.get("content") or "")
    for tc in m.get("tool_calls") or []:
        n += len(json.dumps(tc.get("function", tc)))
    return n


def _tau_bench(root: Path) -> Workload:
    trajs = json.loads((root / "tau-bench" / "gpt-4o-airline.json").read_text())
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
    return Workload("tau-bench", f"tau-bench airline, {len(trajs)} gpt-4o trajectories: {mean_turns:.1f} assistant turns, "
                    f"{statistics.fmean(tools):.1f} tool calls each; tokens ~ chars/4; tool wait ASSUMED 2 s",
                    sessions=64, context_tokens=int(statistics.fmean(final_ctx) / 2),
                    prompt_tokens=int(statistics.fmean(in_tok)), output_tokens=max(1, int(statistics.fmean(out_tok))),
                    tool_wait_s=2.0, turns=round(mean_turns),
                    source="sierra-research/tau-bench historical_trajectories/gpt-4o-airline.json (MIT)")


_BFCL_DOCS = {"GorillaFileSystem": "gorilla_file_system", "MathAPI": "math_api", "MessageAPI": "message_api",
              "TwitterAPI": "posting_api", "TicketAPI": "ticket_api", "TradingBot": "trading_bot",
              "TravelAPI": "travel_booking", "VehicleControlAPI": "vehicle_control"}


def _bfcl(root: Path) -> Workload:
    base = root / "bfcl"
    docs = {c: len((base / "multi_turn_func_doc" / f"{f}.json").read_text()) for c, f in _BFCL_DOCS.items()
            if (base / "multi_turn_func_doc" / f"{f}.json").is_file()}
    entries = [json.loads(line) for line in (base / "BFCL_v4_multi_turn_base.json").read_text().splitlines() if line.strip()]
    answers = {}
    ans_path = base / "possible_answer" / "BFCL_v4_multi_turn_base.json"
    if ans_path.is_file():
        for line in ans_path.read_text().splitlines():
            if line.strip():
                a = json.loads(line)
                answers[a["id"]] = a.get("ground_truth", [])
    prefix, user, out, turns = [], [], [], []
    for e in entries:
        prefix.append(sum(docs.get(c, 0) for c in e.get("involved_classes", [])) / CHARS_PER_TOKEN)
        n = len(e["question"])
        turns.append(n)
        user.append(sum(len(m.get("content", "")) for turn in e["question"] for m in turn) / CHARS_PER_TOKEN / max(n, 1))
        gt = answers.get(e["id"], [])
        out.append(sum(len(c) for turn in gt for c in turn) / CHARS_PER_TOKEN / max(len(gt), 1))
    return Workload("bfcl", f"BFCL v4 multi-turn base: {len(entries)} sessions, {statistics.fmean(turns):.1f} turns, "
                    f"{statistics.fmean(prefix):.0f}-token shared tool-doc prefix; tokens ~ chars/4; tool wait ASSUMED 1 s",
                    sessions=64, context_tokens=int(statistics.fmean(prefix)), prompt_tokens=max(1, int(statistics.fmean(user))),
                    output_tokens=max(1, int(statistics.fmean(out))), tool_wait_s=1.0, turns=round(statistics.fmean(turns)),
                    prefix_reuse=0.0, source="ShishirPatil/gorilla BFCL v4 multi_turn_base (Apache-2.0)")


TRACE_PROFILES: dict[str, Callable[[Path], Workload]] = {
    "mooncake": _mooncake, "azure-conv": lambda r: _azure(r, "conv"), "azure-code": lambda r: _azure(r, "code"),
    "tau-bench": _tau_bench, "bfcl": _bfcl,
}


@lru_cache(maxsize=None)
def _trace_profile(name: str, root: str) -> Workload:
    try:
        return TRACE_PROFILES[name](Path(root))
    except FileNotFoundError as e:
        raise KvstrataError(f"trace files for workload {name!r} not found under {root} ({e.filename}); "
                            "set KVSTRATA_TRACE_DIR to the traces folder") from e


def workload_names() -> list[str]:
    return [*BUILTIN, *TRACE_PROFILES]


def get_workload(name: str) -> Workload:
    if name in BUILTIN:
        return BUILTIN[name]
    if name in TRACE_PROFILES:
        return _trace_profile(name, str(trace_dir()))
    raise KvstrataError(f"unknown workload {name!r}; known: {', '.join(workload_names())}")
