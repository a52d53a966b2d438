"""Compaction that keeps the cache: the model summarises a session's older turns, and the new, shorter
context has its KV computed once and kept, so the turns after it start from a cached prefix.

    res = await compact(aeng, store, skv, sess, owner, CompactionPolicy())          # on request
    res = await maybe_compact(aeng, store, skv, sess, owner, policy, next_prompt_len)  # near the window

Steps, all on the session's own turn path (sessions/turns.py, sessions/kv.py):
1. cut: the messages after the last compaction are split into older ones (summarised) and the most recent
   ~`keep_recent_tokens` (kept verbatim), cut at a user message where one is near, never between a tool
   call and its result;
2. summarise: a turn on a view of the session that ends at the cut, asking for a summary. Its prompt is
   spliced onto the stored token ids, so the history it reads comes from the cache, not recomputed;
3. log: a `compaction` entry (the summary, `kept_from`, counts) is appended; the earlier messages stay in
   the log untouched. The stored token ids become those of the new context (system + summary + tools +
   the recent turns, rendered), with their chain keys, in the same write;
4. keep: SessionKV.warm computes the new context's KV once (a prefill) and releases what the session held
   for its old prefix; with a disk or remote tier the blocks are written down behind it (write-behind),
   so the next turn finds the prefix cached even after a restart.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from kvstrata.core import KvstrataError, SamplingParams, chain_keys
from kvstrata.sessions import turns
from kvstrata.sessions.types import Owner, Session
from kvstrata.tokenizer.tools import render_chat

log = logging.getLogger(__name__)

SUMMARY_REQUEST = (
    "Summarise the conversation so far for your own later use, as notes. Keep every fact the user gave "
    "(names, numbers, places, preferences), the task and its instructions, what the tools returned that "
    "matters, decisions made and what is left to do. Write only the notes.")
_TOOL_CALL_RE = re.compile(r"<tool_call>.*?(</tool_call>|$)", re.S)


class CompactionError(KvstrataError):
    """Nothing to compact, or the summary cannot be made within the window."""


@dataclass(frozen=True)
class CompactionPolicy:
    threshold_tokens: int | None = None  # compact when the next prompt would pass this (None: only on request)
    keep_recent_tokens: int | None = None  # about this much of the latest conversation stays verbatim
    summary_max_tokens: int | None = None  # the summary's length limit
    # (None: a quarter of the window up to 1024, an eighth up to 384)
    request_class: str = "batch"
    instructions: str = SUMMARY_REQUEST


def summary_limit(policy: CompactionPolicy, window: int) -> int:
    return min(384, window // 8) if policy.summary_max_tokens is None else policy.summary_max_tokens


def fixed_tokens(tok: Any, sess: Session) -> int:
    """Tokens of what no compaction can shorten: the system prompt and the tool definitions, rendered as
    every turn renders them (with an empty user message, which the fallback format needs)."""
    msgs = ([{"role": "system", "content": sess.system_prompt}] if sess.system_prompt else []) + [
        {"role": "user", "content": ""}]
    return len(_context_ids(tok, sess, msgs))


def fit_policy(policy: CompactionPolicy, window: int, fixed: int) -> CompactionPolicy:
    """The policy with its unset sizes filled for this window and this session's fixed part (`fixed`: system
    prompt and tools). Defaults: a summary of up to min(384, window / 8) tokens and about min(1024,
    window / 4) recent tokens kept, each cut so that the compacted context (fixed part, summary, recent
    turns) takes at most half of the room the fixed part leaves below the threshold: the rest is for the
    turns until the next compaction. Without that cut a session whose tools fill most of a small window
    (a 4,096 window with 2,900 tokens of tool definitions) could never compact: the fixed sizes alone
    made the compacted context longer than the one it replaced. Sizes given explicitly are kept."""
    room = (policy.threshold_tokens or default_threshold(policy, window, 0)) - fixed
    if room < 64:
        raise CompactionError(f"the system prompt and tool definitions take {fixed} of the window's {window} tokens: "
                              "no room is left for a summary and recent turns")
    summary = policy.summary_max_tokens
    if summary is None:
        summary = max(16, min(summary_limit(policy, window), room // 4))
    recent = policy.keep_recent_tokens
    if recent is None:
        recent = max(0, min(1024, window // 4, room // 2 - summary))
    return dataclasses.replace(policy, keep_recent_tokens=recent, summary_max_tokens=summary)


def default_threshold(policy: CompactionPolicy, window: int, max_tokens: int) -> int:
    """Where to compact by default: before the next step (`max_tokens`) stops fitting, and early enough
    that the summary turn (the context so far, the request, the summary) still fits, so it reads the
    history from the cache instead of a shortened, recomputed view."""
    return window - max(max_tokens, summary_limit(policy, window) + 128)


def _visible(sess: Session) -> tuple[int, list[int]]:
    """(start of the current context in the log, indexes of its visible messages)."""
    msgs = sess.messages
    last = max((i for i, m in enumerate(msgs) if m.get("role") == turns.COMPACTION_ROLE), default=None)
    start = 0 if last is None else int((msgs[last].get("kvstrata") or {}).get("kept_from", last))
    return start, [i for i in range(start, len(msgs)) if not turns.hidden(msgs[i])]


def choose_cut(tok: Any, sess: Session, keep_recent_tokens: int) -> int:
    """The log index of the first message kept verbatim. Walks back from the end until about
    `keep_recent_tokens` are kept, then moves to a turn boundary: a user message if one is within the
    kept part, else an assistant message (never a tool result, which must follow its call)."""
    start, vis = _visible(sess)
    if len(vis) < 2:
        raise CompactionError(f"session {sess.id!r} has nothing to compact: fewer than two messages in its context")
    kept, cut = 0, vis[-1]
    for i in reversed(vis):
        m = sess.messages[i]
        kept += len(tok.encode(str(m.get("content") or "") + str(m.get("tool_calls") or ""), add_special_tokens=False)) + 4
        cut = i
        if kept >= keep_recent_tokens:
            break
    allowed = [i for i in vis if i >= cut and i > vis[0] and sess.messages[i].get("role") in ("user", "assistant")]
    users = [i for i in allowed if sess.messages[i].get("role") == "user"]
    if users:
        return users[0]
    if allowed:
        return allowed[0]
    later = [i for i in vis if i > vis[0] and sess.messages[i].get("role") in ("user", "assistant")]
    if not later:
        raise CompactionError(f"session {sess.id!r} has nothing to compact: no turn boundary after its first message")
    return later[-1]


async def _generate(aeng: Any, prompt: list[int], params: SamplingParams, rclass: str, rid: str) -> Any:
    final = None
    async for out in aeng.generate(prompt, params, request_id=rid, request_class=rclass):
        final = out
    return final


async def compact(aeng: Any, store: Any, skv: Any, sess: Session, owner: Owner, policy: CompactionPolicy,
                  *, reason: str = "requested") -> dict[str, Any]:
    """Compact `sess` now (the caller holds the session's turn lock); `sess` is updated to what the store
    holds. Returns what was done: tokens before / after, seconds, the summary's usage."""
    t0 = time.perf_counter()
    e = aeng.engine
    tok = e.tokenizer
    n = e.max_model_len
    policy = fit_policy(policy, n, fixed_tokens(tok, sess))
    cut = choose_cut(tok, sess, policy.keep_recent_tokens or 0)
    start, _ = _visible(sess)
    # the summary turn reads the session as it was up to the cut, spliced onto the stored ids (cached)
    view = copy.copy(sess)
    marks = [i for i, m in enumerate(sess.messages) if m.get("role") == turns.COMPACTION_ROLE]
    view.messages = sess.messages[:cut] + ([sess.messages[marks[-1]]] if marks and marks[-1] >= cut else [])
    ask = [{"role": "user", "content": policy.instructions}]
    room = e.max_model_len - policy.summary_max_tokens
    plan = turns.plan_turn(e, view, ask, lambda n: SamplingParams(
        max_tokens=max(1, min(policy.summary_max_tokens, e.max_model_len - n)), temperature=0.0))
    if len(plan.prompt) > room:  # the older part alone overflows: summarise its latest messages that fit
        plan = _fitting_plan(e, view, ask, policy, start, cut)
    out = await _generate(aeng, plan.prompt, plan.params, policy.request_class, f"{sess.id}-compact-{time.time_ns()}")
    o = out.outputs[0]
    summary = _TOOL_CALL_RE.sub("", o.text).strip() or "(no summary)"
    m = out.metrics
    mark = {"role": turns.COMPACTION_ROLE, "content": summary, "kvstrata": {
        "kept_from": cut, "summarized_from": start, "summarized_messages": cut - start, "reason": reason,
        "tokens_before": len(sess.token_ids), "summary_tokens": len(o.token_ids), "prompt_tokens": len(plan.prompt),
        "cached_prompt_tokens": m.cached_prompt_tokens, "at": time.time()}}
    after = copy.copy(sess)
    after.messages = sess.messages + [mark]
    ids = _context_ids(tok, after)
    before = max(len(sess.token_ids), len(_context_ids(tok, sess)))
    if len(ids) >= before or len(ids) >= n:
        raise CompactionError(f"compacting session {sess.id!r} would not bring it under its length or the "
                              f"window ({before} -> {len(ids)} tokens, window {n}); keep fewer recent tokens or "
                              "a shorter summary")
    mark["kvstrata"]["tokens_before"] = before
    mark["kvstrata"]["tokens_after"] = len(ids)
    old_ids = list(sess.token_ids)
    keys = chain_keys(ids, e.pool.block_size, e.fingerprint)
    await turns.append(store, sess, owner, [mark], None, token_ids=ids, keep_tokens=0, block_keys=keys, keep_blocks=0)
    warm = await skv.warm(sess, owner, old_ids, request_class=policy.request_class)
    res = {"compacted": True, "reason": reason, "kept_from": cut, "summarized_messages": cut - start,
           "tokens_before": before, "tokens_after": len(ids), "summary": summary,
           "summary_tokens": len(o.token_ids), "summary_prompt_tokens": len(plan.prompt),
           "summary_cached_tokens": m.cached_prompt_tokens, "prefill": warm,
           "seconds": round(time.perf_counter() - t0, 4)}
    log.info("session %s compacted (%s): %d -> %d tokens, %d messages summarised in %.2fs", sess.id, reason,
             before, len(ids), cut - start, res["seconds"])
    return res


def _context_ids(tok: Any, sess: Session, messages: list[dict] | None = None) -> list[int]:
    """The token ids of the session's context as the next turn renders it (without the generation prompt);
    `messages` in place of its history where given, with its tools."""
    msgs = turns.history(sess) if messages is None else messages
    text = render_chat(tok, msgs, tools=sess.tools or None, tool_choice="auto" if sess.tools else None,
                       add_generation_prompt=False)
    return tok.encode(text, add_special_tokens=False)


def _fitting_plan(e: Any, view: Session, ask: list[dict], policy: CompactionPolicy, start: int, cut: int):
    """A summary prompt over the latest messages before the cut that fit the window (no cached prefix:
    only when the older part is itself longer than the window)."""
    room = e.max_model_len - policy.summary_max_tokens
    base = copy.copy(view)
    base.token_ids = []
    for first in range(start, cut):
        if view.messages[first].get("role") not in ("user", "assistant"):
            continue
        base.messages = [{"role": turns.COMPACTION_ROLE, "content": "(earlier turns omitted)",
                          "kvstrata": {"kept_from": first}}] + view.messages[first:cut]
        plan = turns.plan_turn(e, base, ask, lambda n: SamplingParams(
            max_tokens=max(1, min(policy.summary_max_tokens, e.max_model_len - n)), temperature=0.0))
        if len(plan.prompt) <= room:
            return plan
    raise CompactionError("the turns to summarise do not fit the window even one by one; lower keep_recent_tokens")


async def maybe_compact(aeng: Any, store: Any, skv: Any, sess: Session, owner: Owner, policy: CompactionPolicy,
                        next_prompt_tokens: int, refused: list[str] | None = None) -> dict[str, Any] | None:
    """Compact when `next_prompt_tokens` (the next turn's prompt plus its output room) passes the
    policy's threshold; None when it does not, or when there is nothing to compact, or when compacting
    could not shorten it (why is appended to `refused`, when given)."""
    if policy.threshold_tokens is None or next_prompt_tokens <= policy.threshold_tokens:
        return None
    try:
        return await compact(aeng, store, skv, sess, owner, policy, reason="threshold")
    except CompactionError as e:
        log.info("session %s not compacted: %s", sess.id, e)
        if refused is not None:
            refused.append(str(e))
        return None
