"""Memory beyond the window over HTTP: compaction on request, recall search, stored-response
housekeeping, and the background services (the recall thread, the retention sweep).

    POST   /v1/responses/compact             {model, previous_response_id | conversation, input?} -> response.compaction
    GET    /v1/responses/{id}/input_items    ?after&limit&order: the items the request gave
    DELETE /v1/responses/{id}                the stored response (its session stays)
    POST   /v1/sessions/{id}/compact         {keep_recent_tokens, summary_max_tokens}
    POST   /v1/memory/search                 {query, k, session_id?}: the caller's own messages only

`configure(app, recall=..., retention=...)` attaches the services; this router's lifespan starts and stops
them with the app (FastAPI merges an included router's lifespan into the app's). The conversations
routes (server/conversations.py) come with this router.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from kvstrata.memory import CompactionError, CompactionPolicy, compact
from kvstrata.server import conversations
from kvstrata.server import items as it
from kvstrata.server.common import now
from kvstrata.server.errors import APIError
from kvstrata.server.responses import input_to_messages
from kvstrata.server.sessions import session_json
from kvstrata.server.state import ServerState, get_state, owner
from kvstrata.sessions import SessionNotFound, SessionState
from kvstrata.sessions.types import new_response_id

log = logging.getLogger(__name__)


@dataclass
class Retention:
    """TTL and count per owner for sessions and stored responses (None: no limit)."""

    session_ttl_s: float | None = None
    max_sessions_per_owner: int | None = None
    response_ttl_s: float | None = None
    max_responses_per_owner: int | None = None
    sweep_every_s: float = 60.0

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.session_ttl_s, self.max_sessions_per_owner, self.response_ttl_s,
                                           self.max_responses_per_owner))


@dataclass
class MemoryServices:
    recall: Any = None  # kvstrata.memory.Recall, or None (no recall)
    retention: Retention = field(default_factory=Retention)
    policy: CompactionPolicy = field(default_factory=lambda: CompactionPolicy(request_class="interactive"))
    sweeps: dict[str, int] = field(default_factory=lambda: {"sessions": 0, "responses": 0})

    def notify(self) -> None:
        if self.recall is not None:
            self.recall.notify()


def configure(app: Any, *, recall: Any = None, retention: Retention | None = None,
              policy: CompactionPolicy | None = None) -> MemoryServices:
    """Attach the memory services to an app from create_app (before it starts)."""
    ms = MemoryServices(recall=recall, retention=retention or Retention(),
                        policy=policy or CompactionPolicy(request_class="interactive"))
    app.state.kv.memory = ms
    return ms


async def _retention_forever(st: ServerState, r: Retention) -> None:
    while True:
        try:
            got = await st.db(st.store.apply_retention, time.time(), session_ttl_s=r.session_ttl_s,
                              max_sessions_per_owner=r.max_sessions_per_owner, response_ttl_s=r.response_ttl_s,
                              max_responses_per_owner=r.max_responses_per_owner)
            for k, v in got.items():
                st.memory.sweeps[k] += v
            if st.memory.recall is not None and got["sessions"]:
                await asyncio.to_thread(st.memory.recall.index.gc)
        except Exception as e:  # a store hiccup must not end the sweeper
            log.warning("retention sweep failed: %s", e)
        await asyncio.sleep(r.sweep_every_s)


@asynccontextmanager
async def lifespan(app: Any):
    st: ServerState = app.state.kv
    ms: MemoryServices | None = st.memory
    task = None
    if ms is not None and ms.recall is not None:
        ms.recall.start()
    if ms is not None and ms.retention.active:
        task = asyncio.create_task(_retention_forever(st, ms.retention))
    yield
    if task is not None:
        task.cancel()
    if ms is not None and ms.recall is not None:
        await asyncio.to_thread(ms.recall.stop)


router = APIRouter(lifespan=lifespan)
router.include_router(conversations.router)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class CompactBody(_Body):
    keep_recent_tokens: Optional[int] = Field(None, ge=0, description="about this much of the latest conversation stays verbatim")
    summary_max_tokens: Optional[int] = Field(None, ge=16, le=4096)


class ResponsesCompact(CompactBody):
    model: str
    input: Any = None
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    conversation: Any = None


class MemorySearch(_Body):
    query: str = Field(..., min_length=1, max_length=4000)
    k: int = Field(5, ge=1, le=50)
    session_id: Optional[str] = Field(None, description="search one session (or conversation); default: all of yours")


def policy_for(st: ServerState, body: CompactBody | None = None, threshold: int | None = None) -> CompactionPolicy:
    base = st.memory.policy if st.memory is not None else CompactionPolicy(request_class="interactive")
    kw: dict[str, Any] = {"threshold_tokens": threshold if threshold is not None else base.threshold_tokens}
    if body is not None and body.keep_recent_tokens is not None:
        kw["keep_recent_tokens"] = body.keep_recent_tokens
    if body is not None and body.summary_max_tokens is not None:
        kw["summary_max_tokens"] = body.summary_max_tokens
    return CompactionPolicy(**{**base.__dict__, **kw})


async def compact_session(st: ServerState, sess, who, policy: CompactionPolicy, reason: str) -> dict[str, Any]:
    """Compaction of a session the caller holds the lock of; a 400 when there is nothing to compact."""
    if sess.state == SessionState.CLOSED:
        raise APIError(409, f"session {sess.id!r} is closed", code="invalid_state")
    try:
        res = await compact(st.aengine, st.store, st.skv, sess, who, policy, reason=reason)
    except CompactionError as e:
        raise APIError(400, str(e), code="nothing_to_compact") from None
    st.touched_sessions[sess.id] = who
    if st.memory is not None:
        st.memory.notify()
    return res


@router.post("/v1/sessions/{session_id}/compact", tags=["sessions"])
async def compact_session_route(session_id: str, request: Request, body: Optional[CompactBody] = None,
                                who=Depends(owner)):
    """Summarise the session's older turns now; the next turn starts from the compacted prefix, cached."""
    st = get_state(request)
    async with st.session_lock(session_id):
        sess = await st.db(st.store.get_session, session_id, owner=who)
        res = await compact_session(st, sess, who, policy_for(st, body), "requested")
    return {"object": "session.compaction", "session_id": session_id, **res, "session": session_json(sess)}


@router.post("/v1/responses/compact", tags=["openai"])
async def compact_response(body: ResponsesCompact, request: Request, who=Depends(owner)):
    """Compact the conversation a response (or a conversation) continues; returns `response.compaction`
    whose id continues the compacted session as a `previous_response_id`."""
    st = get_state(request)
    st.check_model(body.model)
    if bool(body.previous_response_id) == bool(body.conversation):
        raise APIError(400, "give exactly one of previous_response_id and conversation", param="previous_response_id")
    if body.previous_response_id:
        rec = await st.db(st.store.get_response, body.previous_response_id, owner=who)
        sid = rec.session_id
    else:
        sid = body.conversation["id"] if isinstance(body.conversation, dict) else str(body.conversation)
        await conversations.load(st, sid, who, full=False)
    msgs = input_to_messages(body.input) if body.input else []
    async with st.session_lock(sid):
        sess = await st.db(st.store.get_session, sid, owner=who)
        if msgs:
            from kvstrata.sessions import turns

            await turns.append(st.store, sess, who, msgs, None)
        res = await compact_session(st, sess, who, policy_for(st, body), "requested")
        rid = new_response_id()
        kept = it.log_items(sess.messages, res["kept_from"], len(sess.messages) - 1)
        out = [i for i in kept if i["type"] == "message" and i.get("role") == "user"]
        out += it.log_items(sess.messages, len(sess.messages) - 1)
        usage = {"input_tokens": res["summary_prompt_tokens"], "output_tokens": res["summary_tokens"],
                 "total_tokens": res["summary_prompt_tokens"] + res["summary_tokens"],
                 "input_tokens_details": {"cached_tokens": res["summary_cached_tokens"]},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        resp = {"id": rid, "object": "response.compaction", "created_at": now(), "output": out, "usage": usage,
                "session_id": sid, "tokens_before": res["tokens_before"], "tokens_after": res["tokens_after"]}
        await st.db(st.store.put_response, sid, owner=who, turn=sum(m["role"] == "assistant" for m in sess.messages),
                    output={"response": resp, "num_messages": sess.num_messages, "num_tokens": sess.num_tokens,
                            "input_from": sess.num_messages - 1 - len(msgs), "input_to": sess.num_messages - 1},
                    usage=usage, response_id=rid)
    return resp


@router.get("/v1/responses/{response_id}/input_items", tags=["openai"])
async def input_items(response_id: str, request: Request, who=Depends(owner), after: Optional[str] = None,
                      limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc"):
    """The input items of a stored response: what its request added to the conversation."""
    st = get_state(request)
    rec = await st.db(st.store.get_response, response_id, owner=who)
    out = rec.output if isinstance(rec.output, dict) else {}
    if "input_from" not in out:
        raise APIError(404, f"response {response_id!r} was stored without its input items", code="response_not_found")
    try:
        sess = await st.db(st.store.get_session, rec.session_id, owner=who)
    except SessionNotFound:
        raise APIError(404, f"response {response_id!r} not found", code="response_not_found") from None
    return it.page(it.log_items(sess.messages, out["input_from"], out["input_to"]), after=after, limit=limit,
                   order=order)


@router.delete("/v1/responses/{response_id}", tags=["openai"])
async def delete_response(response_id: str, request: Request, who=Depends(owner)):
    st = get_state(request)
    await st.db(st.store.delete_response, response_id, owner=who)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/memory/stats", tags=["memory"])
async def memory_stats(request: Request):
    """The recall thread's progress (index kind, chunks indexed, sessions behind) and retention's removals."""
    st = get_state(request)
    if st.memory is None:
        return {"recall": None, "retention": None}
    rec = await asyncio.to_thread(st.memory.recall.stats) if st.memory.recall is not None else None
    return {"recall": rec, "retention": dict(st.memory.sweeps)}


@router.post("/v1/memory/search", tags=["memory"])
async def memory_search(body: MemorySearch, request: Request, who=Depends(owner)):
    """The caller's embedded messages nearest to `query` (never another key's)."""
    st = get_state(request)
    if st.memory is None or st.memory.recall is None:
        raise APIError(400, "recall is off on this server (started with --no-recall)", code="recall_disabled")
    if body.session_id is not None:
        await st.db(st.store.get_session_info, body.session_id, owner=who)  # 404 unless it is the caller's
    hits = await st.memory.recall.search(who, body.query, body.k, session_id=body.session_id)
    return {"object": "list", "data": [h.as_dict() for h in hits]}
