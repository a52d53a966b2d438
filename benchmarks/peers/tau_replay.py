"""Replay tau-bench agent trajectories turn by turn against an OpenAI-compatible chat endpoint.

The trace file (tau-bench's gpt-4o-airline results, MIT, read-only) is a list of runs:
``{"task_id", "trial", "reward", "info", "traj": [messages]}``, where the messages are OpenAI chat
messages: system (the ~6 k-character airline policy), user, assistant (with ``tool_calls`` as a string)
and tool results. A *session* is one trajectory; a *turn* is one assistant message of it.

For each turn the client sends the recorded history before it (the same bytes on every peer, so the
growing prefix is what a server's prefix / prompt cache can reuse), asks for about as many tokens as
the recorded reply had (capped; ``ignore_eos`` so every peer generates the same count), then appends
the *recorded* reply, not the generated one. Before a turn that follows a tool result the session
sleeps `tool_wait_s`, standing in for the tool call; other sessions run meanwhile.

Messages are flattened to system / user / assistant so any chat template accepts them: a tool call
becomes assistant text ``<tool_call>{json}</tool_call>``, a tool result a user message
``[tool result: name] ...``; consecutive messages of one role are joined.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks.peers.http_load import percentiles, stream_chat
from benchmarks.common import trace_dir

logger = logging.getLogger(__name__)

# $KVSTRATA_TRACE_DIR, else ../shared/data/traces beside the repository
DEFAULT_TRACE = trace_dir() / "tau-bench" / "gpt-4o-airline.json"


@dataclass
class Turn:
    messages: list[dict]  # the history sent for this turn
    max_tokens: int
    after_tool: bool  # the last message is a tool result: wait before sending


@dataclass
class Session:
    task_id: int
    trial: int
    turns: list[Turn]
    chars: int  # characters of the full flattened history, a size estimate


def _tool_calls_text(raw) -> str:
    calls = raw
    if isinstance(raw, str):
        try:
            calls = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return f"<tool_call>{raw}</tool_call>"
    parts = []
    for c in calls or []:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            pass
        parts.append("<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": args}) + "</tool_call>")
    return "\n".join(parts)


def flatten(traj: list[dict]) -> list[tuple[dict, bool]]:
    """tau-bench messages -> [(message with role system/user/assistant, came_from_tool)], merged by role."""
    out: list[tuple[dict, bool]] = []
    for m in traj:
        role = m.get("role")
        content = m.get("content")
        content = "" if content in (None, "None") else str(content)
        from_tool = False
        if role == "assistant" and m.get("tool_calls"):
            content = (content + "\n" if content else "") + _tool_calls_text(m["tool_calls"])
        elif role == "tool":
            role, from_tool = "user", True
            content = f"[tool result: {m.get('name', 'tool')}] {content}"
        elif role not in ("system", "user", "assistant"):
            continue
        if out and out[-1][0]["role"] == role:
            prev, prev_tool = out[-1]
            out[-1] = ({"role": role, "content": prev["content"] + "\n\n" + content}, prev_tool or from_tool)
        else:
            out.append(({"role": role, "content": content}, from_tool))
    return out


def build_session(run: dict, *, max_tokens_cap: int = 32, chars_per_token: float = 4.0,
                  max_turns: int | None = None) -> Session:
    flat = flatten(run["traj"])
    turns: list[Turn] = []
    for i, (msg, _) in enumerate(flat):
        if msg["role"] != "assistant" or i == 0:
            continue
        want = int(len(msg["content"]) / chars_per_token)
        turns.append(Turn(messages=[m for m, _ in flat[:i]], max_tokens=max(4, min(max_tokens_cap, want)),
                          after_tool=flat[i - 1][1]))
        if max_turns is not None and len(turns) >= max_turns:
            break
    return Session(task_id=run["task_id"], trial=run.get("trial", 0), turns=turns,
                   chars=sum(len(m["content"]) for m, _ in flat))


def load_sessions(path: Path = DEFAULT_TRACE, *, n_sessions: int = 8, trial: int = 0, max_chars: int = 16000,
                  min_tool_turns: int = 1, **kw) -> list[Session]:
    """The first `n_sessions` runs of `trial` (by task_id) with at least `min_tool_turns` turns after a
    tool result and at most `max_chars` characters of history (about max_chars / 3.5 tokens; keeps
    every session inside an 8 k-token context)."""
    runs = json.loads(Path(path).read_text())
    if not isinstance(runs, list) or not runs or "traj" not in runs[0]:
        raise ValueError(f"{path} is not a tau-bench results file (a list of runs with 'traj')")
    runs = sorted((r for r in runs if r.get("trial", 0) == trial), key=lambda r: r["task_id"])
    sessions = []
    for r in runs:
        s = build_session(r, **kw)
        if s.turns and s.chars <= max_chars and sum(t.after_tool for t in s.turns) >= min_tool_turns:
            sessions.append(s)
        if len(sessions) == n_sessions:
            break
    return sessions


@dataclass
class SessionResult:
    task_id: int
    turns: int
    ok_turns: int
    jct_s: float  # job completion time: first send to last token, tool waits included
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def replay_session(client: httpx.AsyncClient, url: str, s: Session, *, tool_wait_s: float,
                         model: str, ignore_eos: bool) -> SessionResult:
    t0 = time.perf_counter()
    res = SessionResult(task_id=s.task_id, turns=len(s.turns), ok_turns=0, jct_s=0.0, prompt_tokens=0,
                        cached_tokens=0, completion_tokens=0)
    for turn in s.turns:
        if turn.after_tool and tool_wait_s > 0:
            await asyncio.sleep(tool_wait_s)
        r = await stream_chat(client, url, turn.messages, max_tokens=turn.max_tokens, model=model,
                              ignore_eos=ignore_eos)
        if not r.ok:
            res.errors.append(r.error)
            continue
        res.ok_turns += 1
        res.prompt_tokens += r.prompt_tokens
        res.cached_tokens += r.cached_tokens or 0
        res.completion_tokens += r.completion_tokens
        if r.ttft_s is not None:
            res.ttft_s.append(r.ttft_s)
    res.jct_s = time.perf_counter() - t0
    return res


async def run_replay(url: str, sessions: list[Session], *, concurrency: int = 4, tool_wait_s: float = 0.5,
                     model: str = "default", ignore_eos: bool = True) -> dict:
    """Replay `sessions`, `concurrency` at a time; returns per-session results and aggregates."""
    queue = iter(sessions)
    results: list[SessionResult] = []
    async with httpx.AsyncClient(timeout=None) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            for s in queue:
                results.append(await replay_session(client, url, s, tool_wait_s=tool_wait_s, model=model,
                                                    ignore_eos=ignore_eos))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    comp = sum(r.completion_tokens for r in results)
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    jcts = [r.jct_s for r in results]
    summary = {
        "sessions": len(results), "concurrency": concurrency, "tool_wait_s": tool_wait_s,
        "turns": sum(r.turns for r in results), "ok_turns": sum(r.ok_turns for r in results),
        "wall_s": round(wall, 2), "completion_tokens": comp, "prompt_tokens": prompt, "cached_tokens": cached,
        "cache_hit_rate": round(cached / prompt, 3) if prompt else None,
        "tokens_per_s": round(comp / wall, 2) if wall else 0.0,
        "prompt_tokens_per_s": round(prompt / wall, 2) if wall else 0.0,
        "jct_s": {"mean": round(sum(jcts) / len(jcts), 2) if jcts else None,
                  **{k: (v / 1000 if v is not None else None) for k, v in percentiles(jcts).items()}},
        "turn_ttft_ms": percentiles([t for r in results for t in r.ttft_s]),
        "errors": [e for r in results for e in r.errors][:5],
        "per_session": [asdict(r) | {"ttft_s": [round(t, 3) for t in r.ttft_s]} for r in results],
    }
    logger.info("tau replay: %d sessions, %.1f tok/s, JCT mean %.1fs, cache hit %.0f%%", len(results),
                summary["tokens_per_s"], summary["jct_s"]["mean"] or 0, 100 * (summary["cache_hit_rate"] or 0))
    return summary


def replay(url: str, sessions: list[Session], **kw) -> dict:
    """Synchronous wrapper of `run_replay`."""
    return asyncio.run(run_replay(url, sessions, **kw))
