"""Chat messages to prompt text and back: templates with tools, tool-call parsing, response formats.

The tool-call syntax itself lives in `kvstrata.tokenizer.tools` (render_chat, parse_tool_calls,
forced_tool_call_spec, validate_tools); this module turns its errors into HTTP 400s.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

from kvstrata.core import KvstrataError
from kvstrata.server.errors import APIError
from kvstrata.tokenizer import tools as _tools

log = logging.getLogger(__name__)


def messages_to_dicts(messages: list[Any]) -> list[dict[str, Any]]:
    """pydantic ChatMessages (or dicts) to plain dicts; OpenAI's `developer` role is a system message."""
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True, by_alias=True) if hasattr(m, "model_dump") else dict(m)
        if d.get("role") == "developer":
            d["role"] = "system"
        if d.get("role") == "tool" and not d.get("tool_call_id"):
            raise APIError(400, "a message with role 'tool' needs the tool_call_id it answers", param="messages")
        out.append(d)
    return out


def render(tok, messages: list[dict], tools: list | None = None, tool_choice: Any = None, *,
           context: int | None = None) -> str:
    """The prompt text for `messages` (with the generation prompt). Raises APIError 400 on bad messages,
    and, with the model's `context` (tokens), ContextLengthError for a text too long to fit."""
    try:
        text = _tools.render_chat(tok, messages, tools=tools, tool_choice=tool_choice, add_generation_prompt=True)
    except KvstrataError as e:
        raise APIError(400, str(e), param="messages") from None
    if context is not None:
        tok.check_fits(text, context)
    return text


def check_tools(tools: list | None, tool_choice: Any) -> tuple[list | None, Any]:
    """Validate tools / tool_choice as OpenAI does; returns (tools or None, tool_choice or None)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs `tools`: give the function definitions", param="tool_choice")
        return None, None
    try:
        _tools.validate_tools(tools)
    except KvstrataError as e:
        raise APIError(400, str(e), param="tools") from None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not name:
            raise APIError(400, 'a named tool_choice is {"type": "function", "function": {"name": ...}}',
                           param="tool_choice")
        if name not in [t["function"]["name"] for t in tools]:
            raise APIError(400, f"tool_choice names {name!r}, which is not in `tools`", param="tool_choice")
    return tools, tool_choice or "auto"


def parses_tools(tools: list | None, tool_choice: Any) -> bool:
    return bool(tools) and tool_choice != "none"


def call_limit(parallel_tool_calls: bool | None, tool_choice: Any = None) -> int:
    """How many tool calls one reply may make: one with `parallel_tool_calls: false` or a named
    tool_choice, else up to MAX_PARALLEL_CALLS (OpenAI's default is parallel calls on)."""
    if parallel_tool_calls is False or isinstance(tool_choice, dict):
        return 1
    return _tools.MAX_PARALLEL_CALLS


def stop_after_call(params, forced: dict | None, parse_tools: bool, max_calls: int):
    """An unconstrained reply that may make one call ends at its closing tag (a stop string: nothing
    after it is generated). `params`: the request's SamplingParams; returns them, with that stop string."""
    if parse_tools and forced is None and max_calls == 1 and _tools.TOOL_CALL_CLOSE not in params.stop:
        return dataclasses.replace(params, stop=(*params.stop, _tools.TOOL_CALL_CLOSE))
    return params


def forced_spec(tools: list | None, tool_choice: Any, max_calls: int = 1) -> dict | None:
    """A constrained-decoding spec that forces a tool call (tool_choice required: 1 to `max_calls` calls;
    named: one), else None."""
    if not tools or tool_choice in (None, "none", "auto"):
        return None
    try:
        return _tools.forced_tool_call_spec(tools, tool_choice, max_calls)
    except KvstrataError as e:
        raise APIError(400, str(e), param="tool_choice") from None


def structured_from_response_format(rf: dict | None, param: str = "response_format") -> dict | None:
    """OpenAI chat `response_format` (or Responses `text.format`) to a SamplingParams.structured spec."""
    if not rf:
        return None
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        js = rf.get("json_schema", rf)  # chat nests it under json_schema; Responses puts it flat
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "json_schema needs a `schema` object", param=param)
        return {"type": "json_schema", "schema": schema, "strict": bool(js.get("strict", False))}
    raise APIError(400, f"unsupported {param} type {kind!r}: use text, json_object or json_schema", param=param)


def split_tool_calls(text: str, max_calls: int | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI tool_calls: at most `max_calls`) from the model's text; every call gets an id."""
    content, calls = _tools.parse_tool_calls(text, max_calls)
    for c in calls:
        c.setdefault("id", "call_" + secrets.token_urlsafe(12))
        c.setdefault("type", "function")
    return content, calls


def assistant_message(text: str, parse_tools: bool, max_calls: int | None = None) -> tuple[dict[str, Any], bool]:
    """The assistant message for a finished choice, and whether it holds tool calls (at most
    `max_calls`). With tools active the content is the text outside the tool-call tags, stripped (what a
    stream of it sends)."""
    if parse_tools:
        return message_of(*split_tool_calls(text, max_calls))
    return {"role": "assistant", "content": text}, False


def message_of(content: str | None, calls: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The assistant message of parsed output (content outside the tags, calls), and whether it calls tools."""
    if calls:
        return {"role": "assistant", "content": content, "tool_calls": calls}, True
    return {"role": "assistant", "content": content or ""}, False


def finish_reason(o, has_calls: bool) -> str:
    if has_calls:
        return "tool_calls"
    return o.finish_reason.value if o.finish_reason is not None else "stop"
