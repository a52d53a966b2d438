"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, for Claude Code and other
Anthropic-protocol agents (shapes in anthropic_format.py, the event stream in anthropic_stream.py).

Every request runs as a session turn (server/turns.py over sessions/turns.py). Without a session
header the session is an in-memory one that is never stored (the device prefix cache still reuses the
KV of a resent history). With `X-Session-Id: <id>` (a session from POST /v1/sessions, or `new`) the
turn runs on that durable session: the client resends the whole conversation as Anthropic clients do,
the server appends only what is new after the session's stored messages, and SessionKV holds the KV
between turns (paused while tools run). A history that no longer extends the stored one (the client
edited or compacted it), or a changed system prompt or tool list, starts a new session; the reply's
`X-Session-Id` header always names the session the turn went to.

Auth takes `x-api-key` (or a Bearer token); errors have Anthropic's shape
`{"type": "error", "error": {"type", "message"}}` (errors.py).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvstrata.core import RequestClass
from kvstrata.server import anthropic_format as af
from kvstrata.server import chat_format as cf
from kvstrata.server.common import SSE_HEADERS, build_sampling, generate_final, keepalive_sse, new_id, now, open_stream
from kvstrata.server.errors import APIError
from kvstrata.server.state import ServerState, get_state, owner
from kvstrata.server.turns import finish_turn, plan_turn
from kvstrata.sessions import Session, SessionNotFound, SessionState

log = logging.getLogger(__name__)
router = APIRouter(tags=["anthropic"])
SESSION_HEADER = "x-session-id"


def _ephemeral(system: str | None, tools: list | None) -> Session:
    t = now()
    return Session(id="ephemeral", owner=None, state=SessionState.ACTIVE, request_class=RequestClass.INTERACTIVE,
                   version=1, created_at=t, updated_at=t, system_prompt=system, tools=tools, messages=[],
                   token_ids=[], metadata={})


async def _session(st: ServerState, sid: str, who: Any, system: str | None, tools: list | None,
                   msgs: list[dict[str, Any]]) -> tuple[Session, list[dict[str, Any]]]:
    """(durable session, the messages new to it) for a request naming session `sid`."""
    sess = None
    if sid != "new":
        try:
            sess = await st.db(st.store.get_session, sid, owner=who)
        except SessionNotFound:
            raise APIError(404, f"session {sid!r} not found; send `X-Session-Id: new` to start one",
                           code="session_not_found") from None
        stored = [af.comparable(m) for m in sess.messages]
        same = (sess.system_prompt == system and sess.tools == tools and len(stored) < len(msgs)
                and stored == [af.comparable(m) for m in msgs[:len(stored)]])
        if same or (not sess.messages and sess.system_prompt == system and sess.tools == tools):
            return sess, msgs[len(stored):]
        log.info("session %s: the history sent does not extend the stored one; starting a new session", sid)
    sess = await st.db(st.store.create_session, owner=who, system_prompt=system, tools=tools,
                       metadata={"api": "anthropic", **({"replaces": sid} if sid != "new" else {})})
    return sess, msgs


class MessagesTurn:
    """A request checked and converted: the session, its new messages and the planned turn."""

    def __init__(self, st: ServerState, body: af.MessagesRequest) -> None:
        st.check_model(body.model)
        self.system = af.system_text(body.system)
        self.tools = af.to_chat_tools(body.tools)
        self.choice = af.to_chat_tool_choice(body.tool_choice)
        self.parallel = af.parallel_tool_calls(body.tool_choice)
        cf.check_tools(self.tools, self.choice)
        self.msgs = af.to_chat_messages(body.messages)
        body.stop = body.stop_sequences
        self.body = body

    def make_params(self, st: ServerState):
        def make(prompt_len: int, forced: dict | None):
            # Anthropic clients send their model's largest output (Claude Code: 32,000) whatever the context
            return build_sampling(st, self.body, prompt_len, max_tokens=self.body.max_tokens, structured=forced,
                                  clamp=True)
        return make


def _reply(mid: str, model: str, msg: dict[str, Any], has_calls: bool, o: Any, u: dict[str, Any]) -> dict[str, Any]:
    reason, seq = af.stop_of(o, has_calls)
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": af.content_blocks(msg),
            "stop_reason": reason, "stop_sequence": seq, "usage": af.usage(u)}


@router.post("/v1/messages")
async def create_message(body: af.MessagesRequest, request: Request, who=Depends(owner)):
    from kvstrata.server.anthropic_stream import events

    st = get_state(request)
    mt = MessagesTurn(st, body)
    sid = request.headers.get(SESSION_HEADER)
    if sid:
        sess, new_msgs = await _session(st, sid, who, mt.system, mt.tools, mt.msgs)
    else:
        sess, new_msgs = _ephemeral(mt.system, mt.tools), mt.msgs
    persist = sess.id != "ephemeral"
    headers = {"X-Session-Id": sess.id} if persist else {}
    mid = new_id("msg_")
    async with st.session_lock(sess.id):
        if persist:
            sess = await st.db(st.store.get_session, sess.id, owner=who)
            await st.skv.resume(sess, who)  # paused on its tool calls: the KV comes back first
        turn = plan_turn(st, sess, new_msgs, mt.make_params(st), tool_choice=mt.choice,
                         parallel_tool_calls=mt.parallel)
        if body.stream:  # started under the lock, so errors (429, too long) are still HTTP statuses
            first, agen = await open_stream(st, request, turn.prompt, turn.params, turn.request_class,
                                            program=sess.id if persist else None, session=persist)
        else:
            out = await generate_final(st, request, turn.prompt, turn.params, turn.request_class,
                                       program=sess.id if persist else None, session=persist)
            res = await finish_turn(st, sess, who, new_msgs, turn, out, persist=persist)
    if body.stream:
        evs = events(st, body.model, mid, sess, who, new_msgs, turn, first, agen, persist)
        return StreamingResponse(keepalive_sse(evs), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    return JSONResponse(_reply(mid, body.model, res.message, res.has_calls, out.outputs[0], res.usage), headers=headers)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: af.CountTokensRequest, request: Request, _who=Depends(owner)):
    st = get_state(request)
    st.check_model(body.model)
    tools = af.to_chat_tools(body.tools)
    choice = af.to_chat_tool_choice(body.tool_choice)
    cf.check_tools(tools, choice)
    msgs = af.to_chat_messages(body.messages)
    if (system := af.system_text(body.system)) is not None:
        msgs = [{"role": "system", "content": system}] + msgs
    text = cf.render(st.tokenizer, msgs, tools, "auto" if tools else None)
    return {"input_tokens": len(st.tokenizer.encode(text, add_special_tokens=False))}
