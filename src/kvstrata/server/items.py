"""A session's log as Responses / Conversations items, and back.

A stored message becomes one or more items: a user / system message an input `message`; an assistant
message an output `message` (its text) and a `function_call` per tool call; a tool message a
`function_call_output`; a compaction entry a `compaction` item (its summary, in plain text, under
`encrypted_content` as the API names the field, and `summary`). Deleted messages (tombstones) are no items.

Item ids name the message's index in the log: `item_<idx>` for its first item, `item_<idx>.<j>` for the
j-th (a tool call after the text), unique within a conversation.
"""

from __future__ import annotations

import re
from typing import Any

from kvstrata.server.errors import APIError
from kvstrata.sessions import turns

_ID = re.compile(r"^item_(\d+)(?:\.(\d+))?$")


def item_id(idx: int, j: int = 0) -> str:
    return f"item_{idx}" if j == 0 else f"item_{idx}.{j}"


def parse_item_id(value: str) -> tuple[int, int]:
    m = _ID.match(value or "")
    if m is None:
        raise APIError(404, f"item {value!r} not found in this conversation", code="item_not_found", param="item_id")
    return int(m.group(1)), int(m.group(2) or 0)


def _text(m: dict[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, list):
        return "".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
    return "" if c is None else str(c)


def message_items(m: dict[str, Any], idx: int) -> list[dict[str, Any]]:
    """The items of stored message `idx` (none for a tombstone)."""
    meta = m.get("kvstrata") if isinstance(m.get("kvstrata"), dict) else {}
    if meta.get("deleted"):
        return []
    role = m.get("role")
    if role == turns.COMPACTION_ROLE:
        return [{"type": "compaction", "id": item_id(idx), "encrypted_content": _text(m), "summary": _text(m),
                 "created_by": "kvstrata", "kept_from": meta.get("kept_from")}]
    if role == "tool":
        return [{"type": "function_call_output", "id": item_id(idx), "call_id": m.get("tool_call_id") or "",
                 "output": _text(m), "status": "completed"}]
    items: list[dict[str, Any]] = []
    if role == "assistant":
        if m.get("content") or not m.get("tool_calls"):
            items.append({"type": "message", "id": item_id(idx), "role": "assistant", "status": "completed",
                          "content": [{"type": "output_text", "text": _text(m), "annotations": [], "logprobs": []}]})
        for c in m.get("tool_calls") or ():
            f = c.get("function") or {}
            items.append({"type": "function_call", "id": item_id(idx, len(items)), "call_id": c.get("id") or "",
                          "name": f.get("name", ""), "arguments": f.get("arguments", "{}"), "status": "completed"})
        return items
    return [{"type": "message", "id": item_id(idx), "role": role or "user", "status": "completed",
             "content": [{"type": "input_text", "text": _text(m)}]}]


def log_items(messages: list[dict[str, Any]], start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
    """Items of messages start..end-1 of a log, in order."""
    out: list[dict[str, Any]] = []
    for idx in range(start, len(messages) if end is None else min(end, len(messages))):
        out.extend(message_items(messages[idx], idx))
    return out


def tombstone(m: dict[str, Any]) -> dict[str, Any]:
    """What a deleted item's message becomes: its role kept (the log's shape), its content gone."""
    return {"role": m.get("role") if m.get("role") != turns.COMPACTION_ROLE else "system", "content": "",
            "kvstrata": {"deleted": True}}


def page(items: list[dict[str, Any]], *, after: str | None, limit: int, order: str) -> dict[str, Any]:
    """An OpenAI list page of `items` (in log order) for `after` / `limit` / `order`."""
    seq = items if order == "asc" else list(reversed(items))
    if after is not None:
        ids = [i["id"] for i in seq]
        if after not in ids:
            raise APIError(404, f"item {after!r} (after) not found in this conversation", code="item_not_found",
                           param="after")
        seq = seq[ids.index(after) + 1:]
    data = seq[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(seq) > limit}
