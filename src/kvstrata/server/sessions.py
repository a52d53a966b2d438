"""The sessions extension, /v1/sessions: durable agent conversations whose KV outlives a request.

    POST   /v1/sessions                      {system, tools, class, messages, metadata} -> session
    GET    /v1/sessions                      ?limit&after&state&order -> list
    GET    /v1/sessions/{id}                 ?include_tokens&locate -> session with messages, where its KV is,
                                             what its turns computed and restored (kv_location, kv_stats)
    DELETE /v1/sessions/{id}
    POST   /v1/sessions/{id}/messages        {messages} (user turns, tool results)
    POST   /v1/sessions/{id}/generate        {sampling..., messages} -> assistant message + usage
    POST   /v1/sessions/{id}/park            {tier, lease_s}: KV down to a tier, pinned until the lease
    POST   /v1/sessions/{id}/resume          prefetch the KV back into device memory
    POST   /v1/sessions/{id}/fork            a copy that shares the prefix (and so its KV)
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

from fastapi import APIRouter, Depends, Query, Request

from kvstrata.core import RequestClass
from kvstrata.server import chat_format as cf
from kvstrata.server.common import build_sampling, new_id
from kvstrata.server.errors import APIError
from kvstrata.server.protocol import MessagesAppend, SessionCreate, SessionFork, SessionGenerate, SessionPark
from kvstrata.server.state import get_state, owner
from kvstrata.memory.tools import expand_tools
from kvstrata.server.turns import run_turn_with_builtins
from kvstrata.sessions import Session, SessionInfo, SessionState, VersionConflict
from kvstrata.sessions.turns import sync

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def session_json(s: SessionInfo, *, include_tokens: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": s.id, "object": "session", "state": s.state.value, "class": s.request_class.value,
        "version": s.version, "created_at": s.created_at, "updated_at": s.updated_at, "parent_id": s.parent_id,
        "lease_expires_at": s.lease_expires_at, "parked_tier": s.parked_tier, "kv_placement": s.kv_placement,
        "num_messages": s.num_messages, "num_tokens": s.num_tokens, "num_blocks": s.num_blocks,
        "metadata": s.metadata,
    }
    if isinstance(s, Session):
        d.update(system=s.system_prompt, tools=s.tools, messages=s.messages)
        if include_tokens:
            d["token_ids"] = s.token_ids
    return d


@router.post("")
async def create_session(body: SessionCreate, request: Request, who=Depends(owner)):
    st = get_state(request)
    st.limits.check_metadata(body.metadata)
    tools = expand_tools(body.tools)  # {"type": "memory_search"}: the built-in recall tool
    cf.check_tools(tools, None)
    msgs = cf.messages_to_dicts(body.messages)
    if any(m["role"] == "system" for m in msgs) and body.system:
        raise APIError(400, "give the system prompt either as `system` or as a system message, not both",
                       param="messages")
    s = await st.db(st.store.create_session, owner=who, messages=msgs, system_prompt=body.system,
                    tools=tools, request_class=RequestClass(body.request_class), metadata=body.metadata)
    return session_json(s)


@router.get("")
async def list_sessions(request: Request, who=Depends(owner), limit: int = Query(20, ge=1, le=1000),
                        after: Optional[str] = None, order: Literal["asc", "desc"] = "desc",
                        state: Optional[Literal["active", "parked", "waiting_on_tool", "closed"]] = None):
    st = get_state(request)
    page = await st.db(st.store.list_sessions, owner=who, limit=limit, after=after, order=order,
                       state=SessionState(state) if state else None)
    data = [session_json(s) for s in page.items]
    return {"object": "list", "data": data, "has_more": page.has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/{session_id}")
async def get_session(session_id: str, request: Request, who=Depends(owner), include_tokens: bool = False,
                      locate: bool = Query(True, description="report where the session's KV is now, per place")):
    st = get_state(request)
    s = await st.db(st.store.get_session, session_id, owner=who)
    d = session_json(s, include_tokens=include_tokens)
    if locate:
        d["kv_location"] = await st.skv.locate(s.token_ids)
    d["kv_stats"] = st.skv.stats.get(s.id)  # since this process started (sessions/stats.py)
    return d


@router.delete("/{session_id}")
async def delete_session(session_id: str, request: Request, who=Depends(owner)):
    st = get_state(request)
    async with st.session_lock(session_id):
        await st.db(st.store.delete_session, session_id, owner=who)
    return {"id": session_id, "object": "session.deleted", "deleted": True}


@router.post("/{session_id}/messages")
async def append_messages(session_id: str, body: MessagesAppend, request: Request, who=Depends(owner)):
    """Append messages (a user turn, tool results) without generating."""
    st = get_state(request)
    msgs = cf.messages_to_dicts(body.messages)
    async with st.session_lock(session_id):
        sess = await st.db(st.store.get_session, session_id, owner=who)
        new_state = None
        if sess.state == SessionState.WAITING_ON_TOOL and any(m["role"] == "tool" for m in msgs):
            new_state = SessionState.ACTIVE
            await st.skv.resume(sess, who)  # the tools returned: the KV comes back for the next turn
        info = await st.db(st.store.append, session_id, owner=who, expected_version=sess.version,
                           messages=msgs, new_state=new_state)
    return session_json(info)


@router.post("/{session_id}/generate")
async def generate(session_id: str, body: SessionGenerate, request: Request, who=Depends(owner)):
    """The next assistant message of the session (after `messages`, if given), appended to it."""
    st = get_state(request)
    new_msgs = cf.messages_to_dicts(body.messages)
    structured = cf.structured_from_response_format(body.response_format)
    top = (body.top_logprobs or 0) if body.logprobs else None

    def make_params(prompt_len: int, forced: dict | None):
        if forced and structured:
            raise APIError(400, "a forced tool call and response_format cannot be combined", param="response_format")
        return build_sampling(st, body, prompt_len, max_tokens=body.max_completion_tokens or body.max_tokens,
                              logprobs=top, structured=forced or structured,
                              max_tokens_param="max_completion_tokens" if body.max_completion_tokens else "max_tokens")

    async with st.session_lock(session_id):
        sess = await st.db(st.store.get_session, session_id, owner=who)
        if sess.state == SessionState.CLOSED:
            raise APIError(409, f"session {session_id!r} is closed; fork it to continue", code="invalid_state")
        if body.expected_version is not None and sess.version != body.expected_version:
            raise VersionConflict(session_id, body.expected_version, sess.version)
        await st.skv.resume(sess, who)  # parked or paused on a tool: the KV comes back first
        turn = await run_turn_with_builtins(st, request, sess, who, new_msgs, make_params, tool_choice=body.tool_choice,
                                            parallel_tool_calls=body.parallel_tool_calls)
    return {
        "id": new_id("gen-"), "object": "session.generation", "session_id": session_id,
        "message": turn.message, "finish_reason": turn.finish_reason, "usage": turn.usage,
        "session": session_json(turn.info) if turn.info else None,
    }


@router.post("/{session_id}/park")
async def park(session_id: str, body: SessionPark, request: Request, who=Depends(owner)):
    """Move the session's KV down to `tier` and pin it there until `lease_s` from now. When the tier
    cannot take every block the session is not marked parked, and `kv.moved` is false."""
    st = get_state(request)
    st.limits.check_lease(body.lease_s)
    async with st.session_lock(session_id):
        sess = await st.db(st.store.get_session, session_id, owner=who)
        if sess.state == SessionState.CLOSED:
            raise APIError(409, f"session {session_id!r} is closed", code="invalid_state")
        kv = await st.skv.park(sess, who, body.tier, body.lease_s)
        if not kv["moved"] and sess.token_ids:
            kv["reason"] = f"the {body.tier} tier did not store the session's KV; the session is not parked"
    return {**session_json(sess), "kv": kv}


@router.post("/{session_id}/resume")
async def resume(session_id: str, request: Request, who=Depends(owner)):
    """Prefetch the session's KV into device memory and make it active (lease and parked tier cleared)."""
    st = get_state(request)
    async with st.session_lock(session_id):
        sess = await st.db(st.store.get_session, session_id, owner=who)
        if sess.state == SessionState.CLOSED:
            raise APIError(409, f"session {session_id!r} is closed; fork it to continue", code="invalid_state")
        loaded = await st.skv.resume(sess, who)
        if not loaded:  # nothing placed: still bring the stored prefix in, as the route promises
            loaded = await st.skv.prefetch(sess.token_ids)
        if sess.state != SessionState.ACTIVE:
            sync(sess, await st.db(st.store.set_state, session_id, SessionState.ACTIVE, owner=who,
                                   expected_version=sess.version, lease_expires_at=None, parked_tier=None,
                                   kv_placement=None))
    return {**session_json(sess), "kv": {"prefetched_tokens": loaded}}


@router.post("/{session_id}/fork")
async def fork(session_id: str, request: Request, body: Optional[SessionFork] = None, who=Depends(owner)):
    """A new session with a copy of this one's history; its turns reuse the shared prefix's KV."""
    st = get_state(request)
    st.limits.check_metadata(body.metadata if body else None)
    s = await st.skv.fork(session_id, who, metadata=body.metadata if body else None)
    return session_json(s)
