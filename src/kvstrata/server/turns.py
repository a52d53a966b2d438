"""One turn of a durable session: render, splice onto the stored token ids, generate, append atomically.

The session's stored token ids are the source of truth: a turn's prompt is those ids (cut only where
the chat template now renders the history differently) followed by the tokens of the new text. So
each turn's prompt starts with the previous turn's prompt *and its generated tokens*, and the
engine's content-addressed prefix cache (device pool or any tier below it) serves that prefix
instead of recomputing it; `usage.prompt_tokens_details.cached_tokens` shows how much.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from kvstrata.core import RequestOutput, SamplingParams, chain_keys
from kvstrata.server import chat_format as cf
from kvstrata.server.common import generate_final, usage
from kvstrata.server.state import ServerState
from kvstrata.sessions import Session, SessionInfo, SessionState
from kvstrata.tokenizer.tokenizer import splice_tokens


log = logging.getLogger(__name__)




def history(sess: Session) -> list[dict[str, Any]]:
    sys_msgs = [{"role": "system", "content": sess.system_prompt}] if sess.system_prompt else []
    return sys_msgs + list(sess.messages)


@dataclass
class TurnResult:
    message: dict[str, Any]  # the assistant message appended
    has_calls: bool
    out: RequestOutput
    usage: dict[str, Any]
    info: SessionInfo | None  # after the append (None when not persisted)
    finish_reason: str


@dataclass
class TurnPlan:
    """What a turn generates from: the prompt (the session's kept ids + the new text's) and its sampling."""
    prompt: list[int]
    params: SamplingParams
    keep: int  # stored token ids kept as the prompt's prefix
    new_ids: list[int]
    parse_tools: bool
    request_class: str


def plan_turn(st: ServerState, sess: Session, new_messages: list[dict[str, Any]], make_params, *,
              tool_choice: Any = None) -> TurnPlan:
    """Render the session's history + `new_messages` and splice it onto the stored token ids."""
    tok = st.tokenizer
    tools, choice = cf.check_tools(sess.tools, tool_choice)
    # tool_choice "none" still advertises the session's tools (only the parsing is off), so the
    # rendered history, and the KV of it, stay the same from turn to turn
    text = cf.render(tok, history(sess) + new_messages, tools, "auto" if choice == "none" else choice,
                     context=st.engine.max_model_len)
    keep, new_ids = splice_tokens(tok, sess.token_ids, text)
    prompt = sess.token_ids[:keep] + new_ids
    params: SamplingParams = make_params(len(prompt), cf.forced_spec(tools, choice))
    rc = sess.request_class.value if hasattr(sess.request_class, "value") else sess.request_class
    return TurnPlan(prompt, params, keep, new_ids, cf.parses_tools(tools, choice), rc)


async def finish_turn(st: ServerState, sess: Session, owner: Any, new_messages: list[dict[str, Any]], plan: TurnPlan,
                      out: RequestOutput, *, persist: bool = True) -> TurnResult:
    """The assistant message of a finished generation, appended with `new_messages` in one write (a
    VersionConflict, 409, if another writer changed the session meanwhile)."""
    o = out.outputs[0]
    msg, has_calls = cf.assistant_message(o.text, plan.parse_tools)
    info = None
    if persist:
        eng = st.engine
        bs = eng.pool.block_size
        full = plan.prompt + list(o.token_ids)
        keys = chain_keys(full, bs, eng.fingerprint)
        keep_blocks = min(len(sess.block_keys), plan.keep // bs)
        info = await st.db(
            st.store.append, sess.id, owner=owner, expected_version=sess.version,
            messages=new_messages + [msg], token_ids=plan.new_ids + list(o.token_ids), keep_tokens=plan.keep,
            block_keys=keys[keep_blocks:], keep_blocks=keep_blocks,
            new_state=SessionState.WAITING_ON_TOOL if has_calls else SessionState.ACTIVE,
        )
        st.touched_sessions[sess.id] = owner
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
    persist: bool = True,
) -> TurnResult:
    """Generate the session's next assistant message after `new_messages`; append both atomically.

    Raises VersionConflict (-> 409) if another writer changed the session meanwhile.
    """
    plan = plan_turn(st, sess, new_messages, make_params, tool_choice=tool_choice)
    out = await generate_final(st, request, plan.prompt, plan.params, plan.request_class)
    return await finish_turn(st, sess, owner, new_messages, plan, out, persist=persist)


async def prefetch(st: ServerState, token_ids: list[int]) -> int | None:
    """Load the session's stored prefix back into device memory (None: the engine cannot yet)."""
    if not token_ids or not hasattr(st.engine, "prefetch"):
        return None
    t0 = time.perf_counter()
    n = await st.aengine.call_async(lambda e: e.prefetch(list(token_ids)))
    log.info("prefetched %s of %d tokens in %.3fs", n, len(token_ids), time.perf_counter() - t0)
    return int(n)


async def unpin(st: ServerState, token_ids: list[int], tier: str | None) -> None:
    """Release the pins a park put on the session's blocks at `tier` (they may be evicted again)."""
    if not tier or not token_ids or not hasattr(st.engine, "unpin"):
        return
    try:
        await st.aengine.call_async(lambda e: e.unpin(list(token_ids), tier))
    except Exception as e:  # the tier is gone from this configuration (e.g. a restart without it)
        log.info("could not unpin %d tokens at %s: %s", len(token_ids), tier, e)


async def sweep_leases(st: ServerState) -> int:
    """Sessions whose lease ended: unpin their KV at the parked tier and clear the lease. They stay
    parked (their KV stays in the tier until evicted); returns how many were swept."""
    from kvstrata.sessions import ANY_OWNER

    expired = await st.db(st.store.sessions_expired_leases, time.time())
    for info in expired:
        try:
            if info.parked_tier:
                sess = await st.db(st.store.get_session, info.id, owner=ANY_OWNER)
                await unpin(st, sess.token_ids, info.parked_tier)
            await st.db(st.store.set_lease, info.id, owner=ANY_OWNER, lease_expires_at=None)
        except Exception as e:  # deleted or closed meanwhile
            log.info("lease sweep: session %s: %s", info.id, e)
    return len(expired)


async def resume_if_parked(st: ServerState, sess: Session, owner: Any) -> Session:
    """A turn on a parked session resumes it first (prefetch, state active, lease cleared)."""
    if sess.state != SessionState.PARKED:
        return sess
    await prefetch(st, sess.token_ids)
    await unpin(st, sess.token_ids, sess.parked_tier)
    info = await st.db(st.store.set_state, sess.id, SessionState.ACTIVE, owner=owner,
                       expected_version=sess.version, lease_expires_at=None, parked_tier=None)
    sess.state, sess.version, sess.parked_tier, sess.lease_expires_at = info.state, info.version, None, None
    return sess


async def park_touched_sessions(st: ServerState, tier: str = "disk", budget_s: float = 30.0) -> int:
    """At graceful shutdown: write the KV of every session this process served down to `tier` and mark
    them parked, so that after a restart their next turn loads the prefix instead of recomputing it.
    Returns how many were parked; does nothing when the engine cannot park."""
    if not hasattr(st.engine, "park") or not st.touched_sessions:
        return 0
    t0 = time.monotonic()
    n = 0
    for sid, owner in list(st.touched_sessions.items()):
        if time.monotonic() - t0 > budget_s:
            log.warning("shutdown: parking budget spent; %d sessions left unparked", len(st.touched_sessions) - n)
            break
        try:
            sess = await st.db(st.store.get_session, sid, owner=owner)
            if sess.state == SessionState.CLOSED or not sess.token_ids:
                continue
            await st.aengine.call_async(lambda e, ids=list(sess.token_ids): e.park(ids, tier))
            await st.db(st.store.park, sid, owner=owner, tier=tier, lease_expires_at=None)
            n += 1
        except Exception as e:  # a deleted session, a tier that is not configured: log and go on
            log.warning("shutdown: could not park session %s: %s", sid, e)
    log.info("shutdown: parked %d sessions at %s in %.2fs", n, tier, time.monotonic() - t0)
    return n
