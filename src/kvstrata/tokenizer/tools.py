"""Tool calls: validating OpenAI tool definitions, rendering tool conversations, parsing tool calls.

A chat template that knows tools (Qwen2.5, Llama 3.1, Hermes, ...) gets them through
`apply_chat_template(..., tools=...)`. A template that does not (SmolLM2, the default model, plain
ChatML) gets the fallback format below, documented in docs/structured.md:

- a system section (appended to the first system message, or a new first system message) listing the
  tools as JSON and telling the model to answer normally or with one
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` per call;
- assistant tool calls rendered as those tags in the assistant's content;
- tool results as a message of role `tool` whose content is
  `<tool_response>{"name": ..., "content": ...}</tool_response>`. The call's id is not written: ids are
  random (new_call_id), so writing them would make the same conversation a different prompt each time it
  runs (greedy agent jobs would not reproduce) and spend ~15 tokens of noise on every result; results
  follow their calls in order, as in Hermes / Qwen2.5's templates.

Both shapes use the same `<tool_call>` JSON that Hermes and Qwen models emit, so `parse_tool_calls`
reads the output of either, and `forced_tool_call_spec` makes the sampler produce exactly it.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any

from kvstrata.core import KvstrataError
from kvstrata.tokenizer.json_bounds import map_subschemas

log = logging.getLogger(__name__)

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_PARALLEL_CALLS = 8  # calls one reply may make when parallel tool calls are allowed
# JSON layout of every constrained output (json_object, json_schema, tool-call arguments): compact, one
# space after ',' and ':' (what json.dumps writes by default), no free whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

FALLBACK_TOOLS_HEADER = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
FALLBACK_TOOLS_FOOTER = (
    "\n</tools>\n\n"
    "Either answer the user directly, or call functions. For each function call, write a JSON object with "
    "the function name and its arguments within <tool_call></tool_call> XML tags, one per call:\n"
    '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>\n'
    "The results come back in a message of role tool, within <tool_response></tool_response> XML tags."
)


# -- tool definitions ----------------------------------------------------------------------------
def validate_tools(tools) -> None:
    """KvstrataError unless `tools` is a list of OpenAI function tools with unique, valid names."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise KvstrataError(f"'tools' must be a list of tool definitions; got {type(tools).__name__}")
    seen: set[str] = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise KvstrataError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}; got {t!r}")
        f = t.get("function")
        if not isinstance(f, dict):
            raise KvstrataError(f"{where} needs a 'function' object with at least a 'name'")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise KvstrataError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'; got {name!r}")
        if name in seen:
            raise KvstrataError(f"{where}: function name {name!r} is defined twice; names must be unique")
        seen.add(name)
        if "description" in f and f["description"] is not None and not isinstance(f["description"], str):
            raise KvstrataError(f"{where}.function.description must be a string")
        p = f.get("parameters")
        if p is not None and (not isinstance(p, dict) or p.get("type", "object") != "object"):
            raise KvstrataError(f"{where}.function.parameters must be a JSON Schema of type 'object'; got {p!r}")


def _tool_choice_name(tool_choice) -> str | None:
    """The forced function's name for {"type": "function", "function": {"name": ...}}, else None."""
    if isinstance(tool_choice, dict):
        f = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise KvstrataError(f"tool_choice must be 'none', 'auto', 'required' or "
                                f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}; got {tool_choice!r}")
        return f["name"]
    if tool_choice not in (None, "none", "auto", "required"):
        raise KvstrataError(f"tool_choice must be 'none', 'auto', 'required' or a function; got {tool_choice!r}")
    return None


def forced_tool_call_spec(tools: list[dict], tool_choice, max_calls: int = 1) -> dict | None:
    """The `SamplingParams.structured` spec that forces a tool call, or None when nothing is forced.

    "required": one to `max_calls` newline-separated calls of any of the tools (parallel tool calls;
    the bound keeps a small model that repeats calls from running to max_tokens); a named function:
    exactly one call of it. The arguments always match the function's parameters schema (see
    `schema_with_options`).
    """
    name = _tool_choice_name(tool_choice)
    if tool_choice != "required" and name is None:
        return None
    validate_tools(tools)
    if not tools:
        raise KvstrataError(f"tool_choice {tool_choice!r} needs at least one tool in 'tools'")
    if isinstance(max_calls, bool) or not isinstance(max_calls, int) or not 1 <= max_calls <= MAX_PARALLEL_CALLS:
        raise KvstrataError(f"max_calls must be 1 to {MAX_PARALLEL_CALLS}; got {max_calls!r}")
    fns = [t["function"] for t in tools]
    if name is not None:
        fns = [f for f in fns if f["name"] == name]
        if not fns:
            have = ", ".join(t["function"]["name"] for t in tools)
            raise KvstrataError(f"tool_choice names function {name!r}, which is not in tools ({have})")
    spec = {
        "type": "tool_call",
        "functions": [{"name": f["name"], "parameters": f.get("parameters") or {"type": "object", "properties": {}},
                       "strict": bool(f.get("strict", False))} for f in fns],
        "max_calls": max_calls if name is None else 1,
    }
    import llguidance

    check_grammar(llguidance.LLMatcher.grammar_from_lark(tool_call_lark(spec)), "tool parameters schema")
    return spec


# -- grammar pieces shared with engine/structured.py (llguidance's JSON / Lark dialect) ------------
def schema_with_options(schema: dict, strict: bool) -> dict:
    """The schema as compiled: objects closed (`close_objects`), numbers of bounded length
    (`json_bounds.bound_numbers`), llguidance's options (x-guidance) set for compact JSON, and unsupported
    keywords an error when `strict`, ignored (with a warning) otherwise."""
    from kvstrata.tokenizer.json_bounds import bound_numbers

    opts = dict(JSON_OPTIONS, lenient=not strict)
    schema = bound_numbers(close_objects(schema))
    user = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
    return {**schema, "x-guidance": {**user, **opts}}


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def close_objects(schema, closable: bool = True):
    """A copy in which every object schema that lists `properties` but says nothing about extra keys
    (no additionalProperties / patternProperties / unevaluatedProperties) gets additionalProperties:
    false. Output under the closed schema still validates against the original; it just never invents
    keys, which small models otherwise do. allOf branches are left open (closing them would conflict).
    """
    if isinstance(schema, list):
        return [close_objects(s, closable) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = map_subschemas(schema, close_objects, _SUBSCHEMA_MAPS, _SUBSCHEMA_LISTS, _SUBSCHEMA_ONE)
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(s, closable=False) for s in out["allOf"]]
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")
    if closable and isinstance(out.get("properties"), dict) and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def tool_call_lark(spec: dict) -> str:
    """Lark grammar for one or more `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`.

    spec: {"type": "tool_call", "functions": [{"name": str, "parameters": schema, "strict": bool}],
    "max_calls": int (default 1)}; several calls are separated by one newline.
    """
    fns = spec.get("functions")
    if not isinstance(fns, list) or not fns:
        raise KvstrataError(f"structured output of type 'tool_call' needs 'functions': a non-empty list of "
                            f"{{name, parameters}}; got {fns!r}")
    alts, rules = [], []
    for i, f in enumerate(fns):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise KvstrataError(f"tool_call function {i} needs a non-empty string 'name'; got {f!r}")
        params = f.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise KvstrataError(f"parameters of function {f['name']!r} must be a JSON Schema object; got {params!r}")
        head = '{"name": ' + json.dumps(f["name"]) + ', "arguments": '
        args = json.dumps(schema_with_options(params, bool(f.get("strict", False))))
        rules.append(f"fn{i}: {json.dumps(head)} args{i} \"}}\"\nargs{i}: %json {args}")
        alts.append(f"fn{i}")
    n = spec.get("max_calls", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KvstrataError(f"structured output of type 'tool_call': max_calls must be a positive integer; got {n!r}")
    start = f'start: call ("\\n" call){{0,{n - 1}}}' if n > 1 else "start: call"
    call = 'call: "<tool_call>" (' + " | ".join(alts) + ') "</tool_call>"'
    return "\n".join([start, call, *rules]) + "\n"


def check_grammar(grammar: str, what: str) -> None:
    """KvstrataError (with llguidance's message) unless `grammar` compiles."""
    import llguidance

    is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise KvstrataError(f"invalid {what}: {msgs[0] if msgs else 'unknown error'}")
    for m in msgs:
        log.warning("%s: %s", what, m)


# -- rendering ------------------------------------------------------------------------------------
def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads a `tools` variable (a rough but standard test)."""
    return bool(tokenizer.chat_template) and re.search(r"\btools\b", tokenizer.chat_template) is not None


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise KvstrataError(f"{where}: only text content parts are supported; got a part of type {kind!r}")
            parts.append(p["text"])
        return "".join(parts)
    raise KvstrataError(f"{where}: content must be a string or a list of text parts; got {type(content).__name__}")


def _arguments(raw, where: str):
    """Tool-call arguments as a dict when they are a JSON object string (what templates expect)."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            v = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return raw
        return v
    raise KvstrataError(f"{where}: function.arguments must be a JSON string; got {type(raw).__name__}")


def _normalize(messages) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise KvstrataError("'messages' must be a non-empty list of chat messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise KvstrataError(f"{where}: role must be one of {', '.join(_ROLES)}; got {got!r}")
        role = "system" if m["role"] == "developer" else m["role"]
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"), where)}
        if m.get("name") is not None:
            msg["name"] = m["name"]
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise KvstrataError(f"{where}.tool_calls must be a list")
            msg["tool_calls"] = []
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise KvstrataError(f"{where}.tool_calls[{j}] needs function.name and function.arguments")
                msg["tool_calls"].append({"id": c.get("id"), "type": "function", "function": {
                    "name": f["name"], "arguments": _arguments(f.get("arguments", "{}"), f"{where}.tool_calls[{j}]")}})
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise KvstrataError(f"{where}: a tool message needs 'tool_call_id' (the id of the call it answers)")
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def format_tool_call(name: str, arguments) -> str:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the exact shape the grammar forces."""
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + TOOL_CALL_CLOSE


def tools_system_section(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return FALLBACK_TOOLS_HEADER + listed + FALLBACK_TOOLS_FOOTER


def _fallback(msgs: list[dict[str, Any]], tools: list[dict] | None) -> list[dict[str, Any]]:
    """Rewrites tool calls and tool results into plain role/content messages (the fallback format)."""
    names: dict[str, str] = {}
    out = []
    for m in msgs:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                names[c["id"]] = c["function"]["name"]
                calls.append(format_tool_call(c["function"]["name"], c["function"]["arguments"]))
            content = "\n".join(([m["content"]] if m["content"] else []) + calls)
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            body = {"name": m.get("name") or names.get(m["tool_call_id"]), "content": m["content"]}
            out.append({"role": "tool", "content": "<tool_response>" + json.dumps(body, ensure_ascii=False)
                        + "</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        section = tools_system_section(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + section).lstrip("\n")}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None, tool_choice=None,
                add_generation_prompt: bool = True) -> str:
    """The prompt text for an OpenAI-style conversation, with tools advertised unless tool_choice is "none"."""
    validate_tools(tools)
    forced = _tool_choice_name(tool_choice)
    if forced is not None and not any(t["function"]["name"] == forced for t in tools or []):
        raise KvstrataError(f"tool_choice names function {forced!r}, which is not in tools")
    advertised = tools if tools and tool_choice != "none" else None
    msgs = _normalize(messages)
    if template_supports_tools(tokenizer):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt, tools=advertised)
    return tokenizer.apply_chat_template(_fallback(msgs, advertised), add_generation_prompt)


# -- parsing --------------------------------------------------------------------------------------
def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18)  # 18 bytes -> 24 urlsafe characters


# `{"name": "f", "arguments": {` (or "parameters"): a call whose arguments object can stream as written
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')
_DECODER = json.JSONDecoder()


def _call(name: str, arguments: str) -> dict:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _as_call(body: str) -> dict | None:
    """A tool call from the text inside the tags, or None. In the usual `{"name": ..., "arguments":
    {...}}` order the arguments are the model's own JSON text (so a stream can send them as generated,
    tool_stream.py); other shapes are re-serialized."""
    head = CALL_HEAD.match(body)
    if head:
        try:
            name = json.loads('"' + head.group(1) + '"')
            args, end = _DECODER.raw_decode(body, head.end())
        except ValueError:
            name, args, end = None, None, 0
        if name and isinstance(args, dict) and body[end:].strip() == "}":
            return _call(name, body[head.end():end])
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return _call(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, max_calls: int | None = None) -> tuple[str | None, list[dict]]:
    """Model output -> (content outside the tool-call tags, stripped, or None; OpenAI tool_calls).

    Reads `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (whitespace inside the tags is
    fine; a last tag left unclosed at the end of the text counts). A tag whose body is not such a JSON
    object stays in the content as written. With `max_calls`, the output ends after that many calls:
    what follows the last one kept is dropped. Never raises.
    """
    if not isinstance(text, str) or TOOL_CALL_OPEN not in text:
        content = text.strip() if isinstance(text, str) else ""
        return (content or None), []
    calls: list[dict] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        call = _as_call(m.group(1).strip())
        kept.append(text[pos:m.start()])
        if call is None:
            kept.append(m.group(0))
        else:
            calls.append(call)
        pos = m.end()
        if max_calls is not None and len(calls) >= max_calls:
            break
    else:
        kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None), calls
