"""Anthropic Messages API shapes: the request model, its messages and tools as chat messages and
OpenAI-style tools (what the turn function renders), and replies as content blocks and usage.

Content blocks read: `text`, `tool_use` (assistant), `tool_result` (user; text or text blocks, with
`is_error`), `thinking` / `redacted_thinking` (dropped: the model does not think). Any other block
(images, documents) is a 400.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import Field

from kvstrata.server.errors import APIError
from kvstrata.server.protocol import SamplingFields, _Lenient

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: Union[str, list[dict[str, Any]]]


class MessagesRequest(SamplingFields):
    model: str = Field(..., examples=["default"])
    messages: list[AnthropicMessage] = Field(..., min_length=1)
    max_tokens: int = Field(..., ge=1)
    system: Union[str, list[dict[str, Any]], None] = None
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, Any]] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=1.0)


class CountTokensRequest(_Lenient):
    model: str
    messages: list[AnthropicMessage] = Field(..., min_length=1)
    system: Union[str, list[dict[str, Any]], None] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[dict[str, Any]] = None


def _blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _text_of(content: Any, where: str) -> str:
    parts = []
    for b in _blocks(content):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise APIError(400, f"{where}: only text blocks are supported here; got {kind!r}", param=where)
        parts.append(b["text"])
    return "".join(parts)


def system_text(system: Any) -> str | None:
    if system is None:
        return None
    return _text_of(system, "system") or None


def to_chat_messages(messages: list[AnthropicMessage]) -> list[dict[str, Any]]:
    """Anthropic messages to chat messages: tool_use blocks become tool_calls, tool_result blocks
    tool messages (before the user's own text of the same message)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        text, calls, results = [], [], []
        for j, b in enumerate(_blocks(m.content)):
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind in ("thinking", "redacted_thinking"):
                continue
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise APIError(400, f"{where}.content[{j}]: a tool_use block needs id and name", param="messages")
                calls.append({"id": b["id"], "type": "function", "function": {
                    "name": b["name"], "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False)}})
            elif kind == "tool_result" and m.role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise APIError(400, f"{where}.content[{j}]: a tool_result block needs tool_use_id", param="messages")
                body = _text_of(b.get("content") or "", f"{where}.content[{j}].content")
                if b.get("is_error"):
                    body = "Error: " + body
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": body})
            else:
                raise APIError(400, f"{where}.content[{j}]: unsupported content block {kind!r} for role {m.role!r} "
                               "(text, tool_use in assistant turns, tool_result in user turns)", param="messages")
        out.extend(results)
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif text or not results:
            out.append({"role": "user", "content": "".join(text)})
    return out


def to_chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise APIError(400, f"tools[{i}] needs a name and an input_schema", param="tools")
        if t.get("type") not in (None, "custom"):
            raise APIError(400, f"tools[{i}]: server tool {t.get('type')!r} is not supported; define a custom tool",
                           param="tools")
        fn = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def to_chat_tool_choice(tc: dict[str, Any] | None) -> Any:
    if tc is None:
        return None
    kind = tc.get("type")
    if kind == "tool":
        if not isinstance(tc.get("name"), str):
            raise APIError(400, 'tool_choice {"type": "tool"} needs the tool\'s name', param="tool_choice")
        return {"type": "function", "function": {"name": tc["name"]}}
    choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if choice is None:
        raise APIError(400, f"tool_choice type must be auto, any, tool or none; got {kind!r}", param="tool_choice")
    return choice


def parallel_tool_calls(tc: dict[str, Any] | None) -> bool | None:
    """`tool_choice.disable_parallel_tool_use: true` as OpenAI's `parallel_tool_calls: false`."""
    if tc is None or tc.get("disable_parallel_tool_use") is None:
        return None
    if not isinstance(tc["disable_parallel_tool_use"], bool):
        raise APIError(400, "tool_choice.disable_parallel_tool_use must be true or false", param="tool_choice")
    return not tc["disable_parallel_tool_use"]


def usage(u: dict[str, Any]) -> dict[str, Any]:
    """OpenAI-style usage (common.usage) as Anthropic's: input_tokens are those computed, not read from cache."""
    cached = u["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": u["prompt_tokens"] - cached, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "output_tokens": u["completion_tokens"]}


def stop_of(o: Any, has_calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished output."""
    if has_calls:
        return "tool_use", None
    if isinstance(o.stop_reason, str):
        return "stop_sequence", o.stop_reason
    return STOP_REASONS.get(o.finish_reason.value if o.finish_reason else "stop", "end_turn"), None


def content_blocks(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """The assistant chat message as Anthropic content blocks."""
    blocks: list[dict[str, Any]] = []
    if msg.get("content"):
        blocks.append({"type": "text", "text": msg["content"]})
    for c in msg.get("tool_calls") or ():
        blocks.append({"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                       "input": json.loads(c["function"]["arguments"] or "{}")})
    return blocks


def comparable(m: dict[str, Any]) -> tuple:
    """What must agree for a stored message and a resent one to be the same turn (call arguments as
    parsed JSON: a client re-serializes them)."""
    calls = tuple((c.get("id"), c["function"]["name"], json.dumps(json.loads(c["function"]["arguments"] or "{}"),
                                                                  sort_keys=True))
                  for c in m.get("tool_calls") or ())
    return m.get("role"), (m.get("content") or "").strip(), calls, m.get("tool_call_id")
