"""OpenAI's Conversations API over durable sessions: a conversation *is* a session (its id is the
session's), so its turns run through the one turn function (sessions/turns.py, through Responses with
`conversation`) and its KV through SessionKV, like any other session's.

    POST   /v1/conversations                      {items, metadata} -> conversation
    GET    /v1/conversations/{id}
    POST   /v1/conversations/{id}                 {metadata}: replaces the metadata
    DELETE /v1/conversations/{id}                 with its log, responses and embeddings
    GET    /v1/conversations/{id}/items           ?after&limit&order (default desc, as OpenAI)
    POST   /v1/conversations/{id}/items           {items} (at most 20): appended
    GET    /v1/conversations/{id}/items/{item}
    DELETE /v1/conversations/{id}/items/{item}    the message becomes a tombstone (out of the prompt)

The client's metadata lives in the session's metadata under `conversation_metadata`; the session's own
metadata keys stay the server's. Owner-scoped like every session: another key's conversation is 404.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from kvstrata.core import RequestClass
from kvstrata.server import items as it
from kvstrata.server.errors import APIError
from kvstrata.server.responses import input_to_messages
from kvstrata.server.state import get_state, owner
from kvstrata.sessions import SessionInfo, SessionNotFound, SessionState
from kvstrata.sessions.turns import sync

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])
META = "conversation_metadata"
MAX_ITEMS_PER_ADD = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ConversationCreate(_Body):
    items: Optional[list[dict[str, Any]]] = Field(None, max_length=MAX_ITEMS_PER_ADD)
    metadata: Optional[dict[str, str]] = None


class ConversationUpdate(_Body):
    metadata: dict[str, str]


class ItemsCreate(_Body):
    items: list[dict[str, Any]] = Field(..., min_length=1, max_length=MAX_ITEMS_PER_ADD)


def _check_metadata(md: dict[str, str] | None) -> dict[str, str]:
    md = md or {}
    if len(md) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in md.items()):
        raise APIError(400, "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters",
                       param="metadata")
    return md


def conversation_json(s: SessionInfo) -> dict[str, Any]:
    return {"id": s.id, "object": "conversation", "created_at": int(s.created_at),
            "metadata": dict(s.metadata.get(META) or {})}


async def load(st, cid: str, who, *, full: bool = True):
    try:
        return await st.db(st.store.get_session if full else st.store.get_session_info, cid, owner=who)
    except SessionNotFound:
        raise APIError(404, f"conversation {cid!r} not found: check the id, and that it was created with the same "
                       "API key", code="conversation_not_found", param="conversation_id") from None


@router.post("")
async def create_conversation(request: Request, body: Optional[ConversationCreate] = None, who=Depends(owner)):
    st = get_state(request)
    body = body or ConversationCreate()
    msgs = input_to_messages(body.items) if body.items else []
    system = None
    if msgs and msgs[0]["role"] == "system":  # a leading system / developer item is the system prompt
        system = msgs.pop(0)["content"]
    s = await st.db(st.store.create_session, owner=who, messages=msgs, system_prompt=system,
                    request_class=RequestClass.INTERACTIVE,
                    metadata={"api": "conversation", META: _check_metadata(body.metadata)})
    return conversation_json(s)


@router.get("/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request, who=Depends(owner)):
    return conversation_json(await load(get_state(request), conversation_id, who, full=False))


@router.post("/{conversation_id}")
async def update_conversation(conversation_id: str, body: ConversationUpdate, request: Request, who=Depends(owner)):
    st = get_state(request)
    await load(st, conversation_id, who, full=False)
    info = await st.db(st.store.update_metadata, conversation_id, {META: _check_metadata(body.metadata)}, owner=who)
    return conversation_json(info)


@router.delete("/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request, who=Depends(owner)):
    st = get_state(request)
    async with st.session_lock(conversation_id):
        sess = await load(st, conversation_id, who)
        if sess.kv_placement is not None or sess.parked_tier is not None:
            await st.skv.resume(sess, who, prefetch=False)  # release its hold or pins first
        await st.db(st.store.delete_session, conversation_id, owner=who)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/{conversation_id}/items")
async def list_items(conversation_id: str, request: Request, who=Depends(owner),
                     after: Optional[str] = None, limit: int = Query(20, ge=1, le=100),
                     order: Literal["asc", "desc"] = "desc"):
    sess = await load(get_state(request), conversation_id, who)
    return it.page(it.log_items(sess.messages), after=after, limit=limit, order=order)


@router.post("/{conversation_id}/items")
async def add_items(conversation_id: str, body: ItemsCreate, request: Request, who=Depends(owner)):
    st = get_state(request)
    msgs = input_to_messages(body.items)
    async with st.session_lock(conversation_id):
        sess = await load(st, conversation_id, who)
        if sess.state == SessionState.CLOSED:
            raise APIError(409, f"conversation {conversation_id!r} is closed", code="invalid_state")
        new_state = None
        if sess.state == SessionState.WAITING_ON_TOOL and any(m["role"] == "tool" for m in msgs):
            new_state = SessionState.ACTIVE
            await st.skv.resume(sess, who)
        start = sess.num_messages
        info = await st.db(st.store.append, conversation_id, owner=who, expected_version=sess.version,
                           messages=msgs, new_state=new_state)
    if st.memory is not None:
        st.memory.notify()
    data = it.log_items(msgs, 0)
    for d, (idx, j) in zip(data, _renumber(msgs, start)):
        d["id"] = it.item_id(idx, j)
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False, "conversation_version": info.version}


def _renumber(msgs: list[dict[str, Any]], start: int) -> list[tuple[int, int]]:
    """(log index, item number) of each item of `msgs` appended at `start`."""
    out = []
    for k, m in enumerate(msgs):
        out.extend((start + k, j) for j in range(len(it.message_items(m, 0))))
    return out


@router.get("/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, request: Request, who=Depends(owner)):
    sess = await load(get_state(request), conversation_id, who)
    idx, j = it.parse_item_id(item_id)
    found = it.message_items(sess.messages[idx], idx) if idx < len(sess.messages) else []
    if j >= len(found):
        raise APIError(404, f"item {item_id!r} not found in conversation {conversation_id!r}", code="item_not_found",
                       param="item_id")
    return found[j]


@router.delete("/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, request: Request, who=Depends(owner)):
    """The item's message leaves the conversation (a tombstone keeps the log's indexes); the next turn's
    splice cuts the stored token ids where the rendering changed, so the prompt no longer holds it."""
    st = get_state(request)
    idx, j = it.parse_item_id(item_id)
    async with st.session_lock(conversation_id):
        sess = await load(st, conversation_id, who)
        if idx >= len(sess.messages) or j >= len(it.message_items(sess.messages[idx], idx)):
            raise APIError(404, f"item {item_id!r} not found in conversation {conversation_id!r}",
                           code="item_not_found", param="item_id")
        info = await st.db(st.store.replace_message, conversation_id, idx, it.tombstone(sess.messages[idx]),
                           owner=who, expected_version=sess.version)
        sync(sess, info)
    return conversation_json(info)
