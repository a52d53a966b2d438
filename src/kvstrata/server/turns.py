"""A session turn over HTTP: the request's tools checked, the shared turn function (sessions/turns.py)
run, the assistant message parsed, and the session's KV handed to SessionKV (sessions/kv.py) when the
reply waits on tool calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from kvstrata.core import ContextLengthError, KvstrataError, RequestOutput, SamplingParams
from kvstrata.server import chat_format as cf
from kvstrata.server.common import generate_final, sum_usage, usage
from kvstrata.server.errors import APIError
from kvstrata.server.state import ServerState
from kvstrata.sessions import Session, SessionInfo, SessionState
from kvstrata.sessions import turns as sturns

log = logging.getLogger(__name__)


@dataclass
class TurnResult:
    message: dict[str, Any]  # the assistant message appended
    has_calls: bool
    out: RequestOutput
    usage: dict[str, Any]
    info: SessionInfo | None  # after the append (None when not persisted)
    finish_reason: str


@dataclass
class HttpTurn:
    """A planned turn and how its output is read (tool calls parsed or not)."""

    plan: sturns.TurnPlan
    parse_tools: bool
    max_calls: int  # tool calls the reply may make (chat_format.call_limit)

    @property
    def prompt(self) -> list[int]:
        return self.plan.prompt

    @property
    def params(self) -> SamplingParams:
        return self.plan.params

    @property
    def request_class(self) -> str:
        return self.plan.request_class


def plan_turn(st: ServerState, sess: Session, new_messages: list[dict[str, Any]], make_params, *,
              tool_choice: Any = None, parallel_tool_calls: bool | None = None) -> HttpTurn:
    """Check the session's tools against `tool_choice`, then render and splice (sessions/turns.py).
    make_params(prompt_len, forced tool-call spec or None) -> SamplingParams."""
    tools, choice = cf.check_tools(sess.tools, tool_choice)
    max_calls = cf.call_limit(parallel_tool_calls, choice)
    forced = cf.forced_spec(tools, choice, max_calls)
    parse = cf.parses_tools(tools, choice)
    try:
        plan = sturns.plan_turn(st.engine, sess, new_messages,
                                lambda n: cf.stop_after_call(make_params(n, forced), forced, parse, max_calls))
    except ContextLengthError:
        raise
    except KvstrataError as e:
        raise APIError(400, str(e), param="messages") from None
    return HttpTurn(plan, parse, max_calls)


async def finish_turn(st: ServerState, sess: Session, owner: Any, new_messages: list[dict[str, Any]], turn: HttpTurn,
                      out: RequestOutput, *, persist: bool = True,
                      parsed: tuple[dict[str, Any], bool] | None = None) -> TurnResult:
    """The assistant message of a finished generation, appended with `new_messages` in one write (a
    VersionConflict, 409, if another writer changed the session meanwhile). A reply that calls tools
    pauses the session: SessionKV places its KV for the wait. `parsed`: the (message, has_calls) a
    stream already parsed and sent (its call ids stand), else parsed from the output here."""
    o = out.outputs[0]
    msg, has_calls = parsed if parsed is not None else cf.assistant_message(o.text, turn.parse_tools, turn.max_calls)
    info = None
    if persist:
        state = SessionState.WAITING_ON_TOOL if has_calls else SessionState.ACTIVE
        info = await sturns.record_turn(st.store, st.engine, sess, owner, new_messages, turn.plan, msg,
                                        list(o.token_ids), state)
        st.touched_sessions[sess.id] = owner
        u, pool = usage(out), st.engine.pool
        st.skv.stats.turn(sess.id, out.metrics.computed_prompt_tokens,
                          u["prompt_tokens_details"]["cached_tokens_by_tier"], pool.block_bytes // pool.block_size)
        if st.memory is not None:  # new messages: the recall thread looks now rather than at its next poll
            st.memory.notify()
        if has_calls:
            tool = (msg["tool_calls"][0].get("function") or {}).get("name")
            await st.skv.pause(sess, owner, tool=tool)
            info = sturns.info_of(sess)
    return TurnResult(msg, has_calls, out, usage(out), info, cf.finish_reason(o, has_calls))


async def run_turn(
    st: ServerState,
    request: Request,
    sess: Session,
    owner: Any,
    new_messages: list[dict[str, Any]],
    make_params,  # (prompt_len, forced tool spec) -> SamplingParams
    *,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    persist: bool = True,
) -> TurnResult:
    """Generate the session's next assistant message after `new_messages`; append both atomically.

    Raises VersionConflict (-> 409) if another writer changed the session meanwhile.
    """
    turn = plan_turn(st, sess, new_messages, make_params, tool_choice=tool_choice,
                     parallel_tool_calls=parallel_tool_calls)
    out = await generate_final(st, request, turn.prompt, turn.params, turn.request_class, program=sess.id,
                               session=True)
    return await finish_turn(st, sess, owner, new_messages, turn, out, persist=persist)


MAX_BUILTIN_ROUNDS = 4  # memory_search calls the server answers itself within one request


def _builtin_only(st: ServerState, turn: TurnResult) -> bool:
    from kvstrata.memory import MEMORY_SEARCH

    calls = turn.message.get("tool_calls") or []
    return (turn.has_calls and turn.info is not None and st.memory is not None and st.memory.recall is not None
            and all((c.get("function") or {}).get("name") == MEMORY_SEARCH for c in calls))


async def run_turn_with_builtins(st: ServerState, request: Request, sess: Session, owner: Any,
                                 new_messages: list[dict[str, Any]], make_params, *, tool_choice: Any = None,
                                 parallel_tool_calls: bool | None = None, persist: bool = True) -> TurnResult:
    """run_turn, then, while the reply calls only the built-in `memory_search` (and recall is on), the
    server runs the searches over the session's own memory, appends their results and generates again
    (at most MAX_BUILTIN_ROUNDS times). The usage is that of every generation together."""
    from kvstrata.memory.tools import run_memory_search

    turn = await run_turn(st, request, sess, owner, new_messages, make_params, tool_choice=tool_choice,
                          parallel_tool_calls=parallel_tool_calls, persist=persist)
    parts = [turn.usage]
    for _ in range(MAX_BUILTIN_ROUNDS):
        if not _builtin_only(st, turn):
            break
        results = []
        for c in turn.message["tool_calls"]:
            content, _err = await run_memory_search(st.memory.recall, owner, sess.id, (c.get("function") or {}).get("arguments"))
            results.append({"role": "tool", "tool_call_id": c.get("id") or "", "name": "memory_search", "content": content})
        await st.skv.resume(sess, owner)  # finish_turn paused the KV for the "tool"; it comes back at once
        turn = await run_turn(st, request, sess, owner, results, make_params, parallel_tool_calls=parallel_tool_calls,
                              persist=persist)
        parts.append(turn.usage)
    if len(parts) > 1:
        turn.usage = sum_usage(parts)
    return turn
