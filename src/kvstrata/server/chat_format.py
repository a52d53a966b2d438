"""Chat messages to prompt text and back: templates with tools, tool-call parsing, response formats.

The tool-call syntax itself lives in `kvstrata.tokenizer.tools` (render_chat, parse_tool_calls,
forced_tool_call_spec, validate_tools). When that module is missing (an older build), messages are
rendered with the plain chat template and no tool calls are parsed.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from kvstrata.core import ContextLengthError, KvstrataError
from kvstrata.server.errors import APIError

log = logging.getLogger(__name__)

try:  # the tool-calling module is written alongside this server
    from kvstrata.tokenizer import tools as _tools
except ImportError:  # pragma: no cover - depends on the build
    _tools = None


def tools_available() -> bool:
    return _tools is not None


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


def _plain_content(c: Any) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    parts = []
    for p in c:
        if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"):
            parts.append(str(p.get("text", "")))
        else:
            raise APIError(400, f"unsupported content part {p.get('type') if isinstance(p, dict) else p!r}: "
                           "this model takes text parts only", param="messages")
    return "".join(parts)


def _fallback_render(tok, messages: list[dict], tools: list | None) -> str:
    msgs = []
    for m in messages:
        d = {"role": m["role"], "content": _plain_content(m.get("content"))}
        for call in m.get("tool_calls") or ():
            fn = call.get("function", {})
            d["content"] += f"<tool_call>\n{json.dumps({'name': fn.get('name'), 'arguments': fn.get('arguments')})}\n</tool_call>"
        msgs.append(d)
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tools=tools)


def render(tok, messages: list[dict], tools: list | None = None, tool_choice: Any = None, *,
           context: int | None = None) -> str:
    """The prompt text for `messages` (with the generation prompt). Raises APIError 400 on bad messages,
    and, with the model's `context` (tokens), ContextLengthError for a text too long to fit (check_fits)."""
    try:
        if _tools is not None:
            text = _tools.render_chat(tok, messages, tools=tools, tool_choice=tool_choice, add_generation_prompt=True)
        else:
            text = _fallback_render(tok, messages, tools)
    except KvstrataError as e:
        raise APIError(400, str(e), param="messages") from None
    if context is not None:
        check_fits(tok, text, context)
    return text


_token_chars: dict[int, int] = {}  # id(tokenizer) -> the most characters one token stands for


def check_fits(tok, text: str, context: int) -> None:
    """ContextLengthError, before tokenizing, for a text that cannot fit in `context` tokens.

    No token stands for more characters than the vocabulary's longest entry (byte-level and
    sentencepiece entries spell at least the characters they decode to); with a factor of 2 for
    normalizers that fold characters, a longer text needs more tokens than the context has. This keeps a
    megabytes-long message from costing gigabytes in the tokenizer before the length check says no."""
    per = _token_chars.get(id(tok))
    if per is None:
        per = _token_chars[id(tok)] = max(map(len, tok.backend.get_vocab(with_added_tokens=True)), default=1)
    most = 2 * per * context + 1024
    if len(text) > most:
        raise ContextLengthError(f"the prompt is {len(text)} characters; the model's context of {context} tokens "
                                 f"holds far fewer (at most about {most}); shorten the prompt")


def check_tools(tools: list | None, tool_choice: Any) -> tuple[list | None, Any]:
    """Validate tools / tool_choice as OpenAI does; returns (tools or None, tool_choice or None)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs `tools`: give the function definitions", param="tool_choice")
        return None, None
    if _tools is not None:
        try:
            _tools.validate_tools(tools)
        except KvstrataError as e:
            raise APIError(400, str(e), param="tools") from None
    else:
        for t in tools:
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict) \
                    or not t["function"].get("name"):
                raise APIError(400, "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                               param="tools")
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not name:
            raise APIError(400, 'a named tool_choice is {"type": "function", "function": {"name": ...}}',
                           param="tool_choice")
        if name not in [t["function"]["name"] for t in tools]:
            raise APIError(400, f"tool_choice names {name!r}, which is not in `tools`", param="tool_choice")
    return tools, tool_choice or "auto"


def parses_tools(tools: list | None, tool_choice: Any) -> bool:
    return bool(tools) and tool_choice != "none" and _tools is not None


def forced_spec(tools: list | None, tool_choice: Any) -> dict | None:
    """A constrained-decoding spec that forces a tool call (tool_choice required or named), else None."""
    if not tools or tool_choice in (None, "none", "auto"):
        return None
    if _tools is None:
        raise APIError(400, "this build cannot force tool calls (kvstrata.tokenizer.tools is missing)",
                       param="tool_choice")
    try:
        return _tools.forced_tool_call_spec(tools, tool_choice)
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


def split_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI tool_calls) from the model's text; every call gets an id."""
    if _tools is None:
        return text, []
    content, calls = _tools.parse_tool_calls(text)
    for c in calls:
        c.setdefault("id", "call_" + secrets.token_urlsafe(12))
        c.setdefault("type", "function")
    return content, calls


def assistant_message(text: str, parse_tools: bool) -> tuple[dict[str, Any], bool]:
    """The assistant message for a finished choice, and whether it holds tool calls."""
    if parse_tools:
        content, calls = split_tool_calls(text)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, True
    return {"role": "assistant", "content": text}, False


def finish_reason(o, has_calls: bool) -> str:
    if has_calls:
        return "tool_calls"
    return o.finish_reason.value if o.finish_reason is not None else "stop"
