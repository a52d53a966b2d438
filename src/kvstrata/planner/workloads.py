"""Workloads: what the machine is asked to carry.

`answer`  : one person waiting on a short prompt; what counts is time to first token and tokens/s.
`agentic` : many sessions with long contexts, each turn followed by a tool wait; what counts is how
            many sessions a machine holds, what a turn costs, and what a finished task costs.
Trace profiles (mooncake, azure-conv, azure-code, tau-bench, bfcl, claude-code) are numbers derived
offline from public traces by benchmarks/workload_profiles.py and stored with their provenance in
data/workloads.json; the library reads only that file (no trace adapters, no trace paths).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from kvstrata.core import KvstrataError

DATA_DIR = Path(__file__).parent / "data"


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
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False)  # trace file, hash, what was computed

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


@lru_cache(maxsize=1)
def trace_profiles() -> dict[str, Workload]:
    """Profiles derived offline from public traces (data/workloads.json, written by benchmarks/workload_profiles.py)."""
    raw = json.loads((DATA_DIR / "workloads.json").read_text())["profiles"]
    fields = {f.name for f in dataclasses.fields(Workload)}
    out = {}
    for name, d in raw.items():
        prov = d.get("provenance", {})
        src = f"{prov.get('repo', '')} {prov.get('file', '')} (sha256 {prov.get('sha256', '?')}) via benchmarks/workload_profiles.py"
        out[name] = Workload(name=name, source=src.strip(), provenance={**prov, **({"stats": d["stats"]} if "stats" in d else {})},
                             **{k: v for k, v in d.items() if k in fields and k not in ("name", "source", "provenance")})
    return out


def workload_names() -> list[str]:
    return [*BUILTIN, *trace_profiles()]


def get_workload(name: str) -> Workload:
    if name in BUILTIN:
        return BUILTIN[name]
    profiles = trace_profiles()
    if name in profiles:
        return profiles[name]
    raise KvstrataError(f"unknown workload {name!r}; known: {', '.join(workload_names())}")
