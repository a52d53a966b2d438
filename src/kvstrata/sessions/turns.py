"""One turn of a durable session, for every caller (the server's session, Responses and chat routes,
and agent jobs): render, splice onto the stored token ids, chain keys, append atomically.

The session's stored token ids are the source of truth: a turn's prompt is those ids (cut only where
the chat template now renders the history differently) followed by the tokens of the new text. So
each turn's prompt starts with the previous turn's prompt *and its generated tokens*, and the
engine's content-addressed prefix cache (device pool or any tier below it) serves that prefix
instead of recomputing it.

    plan = plan_turn(engine, sess, new_messages, make_params)   # render + splice: the prompt
    out = ... generate plan.prompt with plan.params ...
    info = await record_turn(store, engine, sess, owner, new_messages, plan, message, out_token_ids, state)

`record_turn` first waits (at most DURABLE_WAIT_S) until the turn's blocks are written to the durable
tiers behind it (kv/offload.py: so a SIGKILL after the reply loses none of the turn's KV), then appends the new messages, the assistant message, the new token ids and the chain keys of
the session's full blocks in one store write (VersionConflict if another writer changed the session
since it was read), and updates the caller's Session to match the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvstrata.core import RequestClass, SamplingParams, chain_keys
from kvstrata.sessions.store import SessionStore
from kvstrata.sessions.types import Owner, Session, SessionInfo, SessionState
from kvstrata.tokenizer.tokenizer import splice_tokens
from kvstrata.tokenizer.tools import render_chat

log = logging.getLogger(__name__)

COMPACTION_ROLE = "compaction"  # a log entry: the summary of the turns before `kept_from` (memory/compaction.py)
DURABLE_WAIT_S = 5.0  # a turn waits at most this long for its blocks' writes behind it before it is recorded
SUMMARY_HEADER = "Summary of the earlier conversation (its older turns were compacted into this):"
CONTINUE_NOTE = "(The conversation continues after the summary above.)"


def hidden(m: dict[str, Any]) -> bool:
    """A log entry that is not part of the prompt: a compaction item, or a deleted (tombstoned) message."""
    meta = m.get("kvstrata")
    return m.get("role") == COMPACTION_ROLE or (isinstance(meta, dict) and bool(meta.get("deleted")))


def history(sess: Session) -> list[dict[str, Any]]:
    """The session's conversation as chat messages, its system prompt first.

    The log keeps every event. After a compaction (a `compaction` entry holding a summary and
    `kvstrata.kept_from`, the first message kept verbatim) the prompt is: the system prompt with the
    summary appended, then the messages from `kept_from` on (a short user note first when they do not
    start with a user message, so every chat template accepts the order). Tombstones are left out."""
    msgs, system = sess.messages, sess.system_prompt
    last = max((i for i, m in enumerate(msgs) if m.get("role") == COMPACTION_ROLE), default=None)
    if last is None:
        recent = [m for m in msgs if not hidden(m)]
    else:
        mark = msgs[last]
        kept = int((mark.get("kvstrata") or {}).get("kept_from", last))
        recent = [m for m in msgs[kept:last] + msgs[last + 1:] if not hidden(m)]
        system = (system + "\n\n" if system else "") + SUMMARY_HEADER + "\n" + str(mark.get("content") or "")
        if recent and recent[0].get("role") != "user":
            recent = [{"role": "user", "content": CONTINUE_NOTE}] + recent
    sys_msgs = [{"role": "system", "content": system}] if system else []
    return sys_msgs + list(recent)


@dataclass
class TurnPlan:
    """What a turn generates from: the session's kept ids + the new text's, and its sampling."""

    prompt: list[int]
    params: SamplingParams
    keep: int  # stored token ids kept as the prompt's prefix
    new_ids: list[int]  # the prompt's ids after them
    request_class: str


def plan_turn(engine: Any, sess: Session, new_messages: Sequence[dict[str, Any]],
              make_params: Callable[[int], SamplingParams]) -> TurnPlan:
    """Render the session's history + `new_messages` and splice it onto the stored token ids.

    The session's tools are always advertised (tool_choice only changes what is parsed or forced), so
    the rendered history, and the KV of it, stay the same from turn to turn. `make_params(prompt_len)`
    gives the turn's sampling. Raises KvstrataError on messages the template cannot render,
    ContextLengthError (before tokenizing) for a text far longer than the model's window."""
    tok = engine.tokenizer
    tools = sess.tools or None
    text = render_chat(tok, history(sess) + list(new_messages), tools=tools, tool_choice="auto" if tools else None)
    tok.check_fits(text, engine.max_model_len)  # a text far past the window is refused before tokenizing
    keep, new_ids = splice_tokens(tok, sess.token_ids, text)
    prompt = sess.token_ids[:keep] + new_ids
    return TurnPlan(prompt, make_params(len(prompt)), keep, new_ids, RequestClass(sess.request_class).value)


async def record_turn(store: SessionStore, engine: Any, sess: Session, owner: Owner,
                      new_messages: Sequence[dict[str, Any]], plan: TurnPlan, message: dict[str, Any],
                      generated: Sequence[int], state: SessionState) -> SessionInfo:
    """Append `new_messages` + the assistant `message`, the turn's token ids and its blocks' chain keys
    in one write; `sess` is updated to match. Raises VersionConflict if the session moved meanwhile."""
    bs = engine.pool.block_size
    full = plan.prompt + list(generated)
    keys = chain_keys(full, bs, engine.fingerprint)
    keep_blocks = min(len(sess.block_keys), plan.keep // bs)
    if engine.offload is not None and not await asyncio.to_thread(engine.offload.wait_durable, keys, DURABLE_WAIT_S):
        log.warning("session %s: the turn's KV was not all written behind within %.0f s; a crash now costs a "
                    "recompute of its tail", sess.id, DURABLE_WAIT_S)
    return await append(store, sess, owner, [*new_messages, message], state, token_ids=plan.new_ids + list(generated),
                        keep_tokens=plan.keep, block_keys=keys[keep_blocks:], keep_blocks=keep_blocks)


async def append(store: SessionStore, sess: Session, owner: Owner, messages: Sequence[dict[str, Any]],
                 state: SessionState | None, *, token_ids: Sequence[int] = (), keep_tokens: int | None = None,
                 block_keys: Sequence[bytes] = (), keep_blocks: int | None = None) -> SessionInfo:
    """store.append at the session's version, then the same change on `sess` (messages, ids, keys,
    version, state), so the caller goes on with what the store holds."""
    info = await asyncio.to_thread(
        store.append, sess.id, owner=owner, expected_version=sess.version, messages=list(messages),
        token_ids=list(token_ids), keep_tokens=keep_tokens, block_keys=list(block_keys), keep_blocks=keep_blocks,
        new_state=state)
    sess.messages.extend(messages)
    if keep_tokens is not None:
        del sess.token_ids[keep_tokens:]
    sess.token_ids.extend(token_ids)
    if keep_blocks is not None:
        del sess.block_keys[keep_blocks:]
    sess.block_keys.extend(block_keys)
    sync(sess, info)
    return info


def info_of(sess: SessionInfo) -> SessionInfo:
    """The SessionInfo part of a Session (what listings and replies show)."""
    return SessionInfo(**{f.name: getattr(sess, f.name) for f in dataclasses.fields(SessionInfo)})


def sync(sess: SessionInfo, info: SessionInfo) -> None:
    """Copy the store's scalar fields (version, state, lease, placement, counts) onto a held Session."""
    for f in ("version", "state", "updated_at", "lease_expires_at", "parked_tier", "kv_placement", "num_messages",
              "num_tokens", "num_blocks", "metadata"):
        setattr(sess, f, getattr(info, f))
