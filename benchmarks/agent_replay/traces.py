"""The traces the replay reads, as one shape: sessions of requests, each request a list of block hash ids.

Three formats under the trace folder (`benchmarks.common.trace_dir()`: $KVSTRATA_TRACE_DIR, else
``../shared/data/traces`` beside the repository; never edited):

* **claude-code/** (`load_claude_code`): one real Claude Code session per file. Per request ``t`` (s from the
  session's start), ``in`` / ``out`` tokens, ``hash_ids`` (one id per *whole* 64-token block, so
  ``len(hash_ids) == in // 64``; ids are local to the file, sub-agents included), ``stop`` (``tool_use`` /
  ``end_turn``), ``think_time`` (s from the previous response to this send: tool runs, the user) and
  ``api_time`` (s the response took). A ``type: "subagent"`` entry nests a sub-agent with its own requests;
  its ``t`` is when it *finished* (``t - duration_ms / 1000`` is its start: in trace_0274 three Explore
  agents start together 0.5 s after the parent's first response and the parent's next request follows the
  last one home). A sub-agent is attached to the parent request it follows and the parent waits for it.
* **mooncake/synthetic_trace.jsonl** (`load_mooncake`): independent requests, ``timestamp`` (ms) arrivals,
  ``input_length`` / ``output_length`` and 512-token-block ``hash_ids`` (global scope): each request is a
  one-request session arriving at its timestamp.
* **tau-bench/gpt-4o-airline.json** (`load_tau`): agent trajectories as chat messages, no timings. Each
  message becomes ceil(chars / 4 / 16) blocks of 16 tokens whose ids hash the message text, so the shared
  policy prompt is shared across sessions and a turn's history is the previous turn's prompt plus the
  messages since; waits are fixed (`tool_wait_s` after a tool call, `user_wait_s` after a text answer).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("claude-code", "mooncake", "tau-bench")


@dataclass(frozen=True)
class Request:
    hash_ids: tuple[int, ...]
    input_tokens: int  # as traced (full scale)
    output_tokens: int
    think_s: float  # traced seconds from the previous response (or the sub-agents it spawned) to this send
    stop: str = ""  # "tool_use", "end_turn" or "" as traced
    # sub-agents spawned after this request's response: (traced delay after it, session); the next request of
    # this session waits until all of them finished
    subagents: tuple[tuple[float, "Session"], ...] = ()


@dataclass(frozen=True)
class Session:
    id: str  # "claude-code/trace_0274", "claude-code/trace_0274/agent_001", "mooncake/17", ...
    namespace: str  # scope of the hash ids: equal (namespace, id) = equal tokens
    block_tokens: int  # traced tokens per hash-id block
    requests: tuple[Request, ...]
    arrival_s: float = 0.0  # traced arrival, seconds from the start of the run
    kind: str = "claude-code"
    meta: dict = field(default_factory=dict, compare=False)

    def all_requests(self) -> int:
        """Requests of this session and, recursively, of its sub-agents."""
        return sum(1 + sum(s.all_requests() for _, s in r.subagents) for r in self.requests)


def default_trace_dir() -> Path:
    from benchmarks.common import trace_dir

    return trace_dir()


def resolve(trace: str | Path) -> tuple[str, Path]:
    """(format, path) for a format name (looked up in the trace folder) or a file / folder path."""
    if str(trace) in FORMATS:
        root = default_trace_dir()
        path = {"claude-code": root / "claude-code", "mooncake": root / "mooncake" / "synthetic_trace.jsonl",
                "tau-bench": root / "tau-bench" / "gpt-4o-airline.json"}[str(trace)]
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: set KVSTRATA_TRACE_DIR to the folder holding the traces "
                                    f"(default ../shared/data/traces beside the repository)")
        return str(trace), path
    p = Path(trace)
    if p.is_dir():
        return "claude-code", p
    if p.suffix == ".jsonl":
        return "mooncake", p
    if p.suffix == ".json":
        head = p.read_text()[:4096].lstrip()
        return ("tau-bench" if head.startswith("[") else "claude-code"), p
    raise ValueError(f"cannot tell the trace format of {p}: give a folder of Claude Code traces, a Mooncake "
                     f".jsonl or a tau-bench .json, or one of {FORMATS}")


def load(trace: str | Path, n_sessions: int | None = None, **kw) -> list[Session]:
    fmt, path = resolve(trace)
    loader = {"claude-code": load_claude_code, "mooncake": load_mooncake, "tau-bench": load_tau}[fmt]
    return loader(path, n_sessions=n_sessions, **kw)


# ---------------------------------------------------------------------------------------------- Claude Code


def _cc_requests(entries: list[dict], sid: str, ns: str, block: int, max_requests: int | None) -> tuple[Request, ...]:
    plain = [e for e in entries if e.get("type") != "subagent"]
    if max_requests is not None:
        plain = plain[:max_requests]
    ends = [e["t"] + (e.get("api_time") or 0.0) for e in plain]
    subs: dict[int, list[tuple[float, Session]]] = {}
    joined_at: dict[int, float] = {}  # request index after a gap with sub-agents -> traced time the last one ended
    for e in entries:
        if e.get("type") != "subagent":
            continue
        start = e["t"] - (e.get("duration_ms") or 0) / 1000.0
        before = [i for i, r in enumerate(plain) if r["t"] <= start]
        if not before:
            continue  # a sub-agent before the session's first request (none in the traces): not replayed
        i = before[-1]
        name = e.get("agent_id") or f"agent_{len(subs.get(i, [])):03d}"
        sub = Session(id=f"{sid}/{name}", namespace=ns, block_tokens=block, kind="claude-code",
                      requests=_cc_requests(e.get("requests") or [], f"{sid}/{name}", ns, block, max_requests),
                      meta={"subagent_type": e.get("subagent_type")})
        if sub.requests:
            subs.setdefault(i, []).append((max(0.0, start - ends[i]), sub))
            joined_at[i + 1] = max(joined_at.get(i + 1, 0.0), e["t"])
    out = []
    for i, e in enumerate(plain):
        if i in joined_at:
            think = max(0.0, e["t"] - joined_at[i])
        elif e.get("think_time") is not None:
            think = float(e["think_time"])
        else:
            think = max(0.0, e["t"] - ends[i - 1]) if i else 0.0
        out.append(Request(hash_ids=tuple(e["hash_ids"]), input_tokens=int(e["in"]), output_tokens=int(e["out"]),
                           think_s=think, stop=e.get("stop") or "", subagents=tuple(subs.get(i, ()))))
    return tuple(out)


def load_claude_code(folder: Path, n_sessions: int | None = None, *, session_gap_s: float = 0.0,
                     max_requests: int | None = None, files: list[str] | None = None) -> list[Session]:
    """The sessions of `folder`/trace_*.json in file-name order (or the named `files`); session k arrives at
    k x `session_gap_s` traced seconds. `max_requests` keeps the first requests of each (sub-)session."""
    paths = sorted(folder.glob("trace_*.json")) if folder.is_dir() else [folder]
    if files:
        paths = [folder / (f if f.endswith(".json") else f + ".json") for f in files]
    out: list[Session] = []
    for p in paths:
        d = json.loads(p.read_text())
        if "requests" not in d:
            raise ValueError(f"{p} is not a Claude Code trace (no 'requests')")
        sid = f"claude-code/{d.get('id', p.stem)}"
        ns = sid if d.get("hash_id_scope", "local") == "local" else "claude-code"
        block = int(d.get("block_size", 64))
        reqs = _cc_requests(d["requests"], sid, ns, block, max_requests)
        if not reqs:
            continue
        out.append(Session(id=sid, namespace=ns, block_tokens=block, requests=reqs, kind="claude-code",
                           arrival_s=len(out) * session_gap_s, meta={"models": d.get("models")}))
        if n_sessions is not None and len(out) == n_sessions:
            break
    return out


# ---------------------------------------------------------------------------------------------- Mooncake


def load_mooncake(path: Path, n_sessions: int | None = None, *, block_tokens: int = 512, **_) -> list[Session]:
    """One single-request session per line, arriving at its timestamp (ms); hash ids are global."""
    out = []
    with open(path) as f:
        for k, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            req = Request(hash_ids=tuple(r["hash_ids"]), input_tokens=int(r["input_length"]),
                          output_tokens=int(r["output_length"]), think_s=0.0)
            out.append(Session(id=f"mooncake/{k}", namespace="mooncake", block_tokens=block_tokens, requests=(req,),
                               arrival_s=r["timestamp"] / 1000.0, kind="mooncake"))
            if n_sessions is not None and len(out) == n_sessions:
                break
    return out


# ---------------------------------------------------------------------------------------------- tau-bench


def _text_id(text: str, k: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{k}\0{text}".encode(), digest_size=7).digest(), "big")


def load_tau(path: Path, n_sessions: int | None = None, *, trial: int = 0, tool_wait_s: float = 5.0,
             user_wait_s: float = 30.0, chars_per_token: float = 4.0, block_tokens: int = 16, **_) -> list[Session]:
    """Trajectories of `trial` by task id; a request per recorded assistant message (its history as blocks of
    the message texts, its length as the output); waits `tool_wait_s` after a tool call, else `user_wait_s`."""
    from benchmarks.peers.tau_replay import flatten

    runs = json.loads(Path(path).read_text())
    if not isinstance(runs, list) or not runs or "traj" not in runs[0]:
        raise ValueError(f"{path} is not a tau-bench results file (a list of runs with 'traj')")
    out = []
    for run in sorted((r for r in runs if r.get("trial", 0) == trial), key=lambda r: r["task_id"]):
        flat = flatten(run["traj"])
        ids: list[int] = []
        reqs = []
        prev_tool = False
        for i, (msg, _) in enumerate(flat):
            if msg["role"] == "assistant" and i > 0:
                out_tok = max(1, math.ceil(len(msg["content"]) / chars_per_token))
                think = 0.0 if not reqs else (tool_wait_s if prev_tool else user_wait_s)
                reqs.append(Request(hash_ids=tuple(ids), input_tokens=len(ids) * block_tokens, output_tokens=out_tok,
                                    think_s=think, stop="tool_use" if "<tool_call>" in msg["content"] else "end_turn"))
                prev_tool = reqs[-1].stop == "tool_use"
            n_blocks = max(1, math.ceil(len(msg["content"]) / chars_per_token / block_tokens))
            ids += [_text_id(msg["role"] + "\0" + msg["content"], k) for k in range(n_blocks)]
        if reqs:
            out.append(Session(id=f"tau-bench/{run['task_id']}", namespace="tau-bench", block_tokens=block_tokens,
                               requests=tuple(reqs), kind="tau-bench"))
        if n_sessions is not None and len(out) == n_sessions:
            break
    return out
