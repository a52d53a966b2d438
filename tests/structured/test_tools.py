"""Tool definitions, tool-call parsing, forced-call specs and chat rendering (no model needed)."""

from __future__ import annotations

import json
import re

import pytest
import tokenizers

from kvstrata.core import KvstrataError
from kvstrata.tokenizer.tokenizer import CHATML_TEMPLATE, Tokenizer
from kvstrata.tokenizer.tools import (
    close_objects,
    forced_tool_call_spec,
    new_call_id,
    parse_tool_calls,
    render_chat,
    template_supports_tools,
    validate_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}
ID_RE = re.compile(r"^call_[A-Za-z0-9_-]{24}$")

# A template that renders tools natively, in the style of Qwen2.5's (tools and tool_calls via tojson).
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}\nCALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tok(template: str | None) -> Tokenizer:
    return Tokenizer(backend=tokenizers.Tokenizer(tokenizers.models.BPE()), chat_template=template,
                     eos_token="<|im_end|>")


# -- parse_tool_calls ------------------------------------------------------------------------------
def test_parse_multiple_calls_with_surrounding_text():
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>\n  {"name":"add","arguments":{"a":1,"b":2}}\n</tool_call> Done.')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check. \n Done."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"a": 1, "b": 2}]
    for c in calls:
        assert c["type"] == "function" and ID_RE.match(c["id"])
    assert calls[0]["id"] != calls[1]["id"]


def test_parse_plain_text_and_empty():
    assert parse_tool_calls("  hello  ") == ("hello", [])
    assert parse_tool_calls("") == (None, [])
    content, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {}}</tool_call>')
    assert content is None and len(calls) == 1 and calls[0]["function"]["arguments"] == "{}"


def test_parse_malformed_json_stays_content():
    bad = '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>'
    good = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    content, calls = parse_tool_calls("before " + bad + " " + good)
    assert calls and len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    assert content == "before " + bad
    for text in ['<tool_call>["not", "an", "object"]</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
                 '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "<tool_call></tool_call>"]:
        assert parse_tool_calls(text) == (text, [])


def test_parse_variants_hermes_string_arguments_unclosed_tag():
    # arguments given as a JSON string, "parameters" instead of "arguments", a last tag never closed
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}</tool_call>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": [1, 2]}
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "parameters": {"y": "é"}}</tool_call>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"y": "é"}
    content, calls = parse_tool_calls('ok <tool_call>{"name": "f", "arguments": {"z": 1}}\n')
    assert content == "ok" and json.loads(calls[0]["function"]["arguments"]) == {"z": 1}


def test_parse_never_raises_on_garbage():
    for text in ["<tool_call>", "</tool_call>", "<tool_call><tool_call>{}</tool_call>", "<tool_call>{\"name\": 5}",
                 "<tool_call>" * 3 + "}" * 5, None]:
        parse_tool_calls(text)  # type: ignore[arg-type]


# -- validate_tools / forced_tool_call_spec ---------------------------------------------------------
@pytest.mark.parametrize("tools, msg", [
    ("get_weather", "must be a list"),
    ([{"type": "function"}], "needs a 'function'"),
    ([{"type": "function", "function": {"description": "x"}}], "name"),
    ([{"type": "function", "function": {"name": "has space"}}], "name"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "parameters"),
    ([ADD, ADD], "defined twice"),
])
def test_validate_tools_rejects_malformed(tools, msg):
    with pytest.raises(KvstrataError, match=msg):
        validate_tools(tools)


def test_validate_tools_accepts_good_and_none():
    validate_tools(None)
    validate_tools([WEATHER, ADD, {"type": "function", "function": {"name": "noargs"}}])


def test_forced_spec_by_tool_choice():
    assert forced_tool_call_spec([WEATHER], "auto") is None
    assert forced_tool_call_spec([WEATHER], "none") is None
    assert forced_tool_call_spec([WEATHER], None) is None
    req = forced_tool_call_spec([WEATHER, ADD], "required")
    assert req["type"] == "tool_call" and [f["name"] for f in req["functions"]] == ["get_weather", "add"]
    named = forced_tool_call_spec([WEATHER, ADD], {"type": "function", "function": {"name": "add"}})
    assert [f["name"] for f in named["functions"]] == ["add"]
    assert named["functions"][0]["parameters"] == ADD["function"]["parameters"]


def test_forced_spec_errors():
    with pytest.raises(KvstrataError, match="not in tools"):
        forced_tool_call_spec([WEATHER], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(KvstrataError, match="at least one tool"):
        forced_tool_call_spec([], "required")
    with pytest.raises(KvstrataError, match="tool_choice"):
        forced_tool_call_spec([WEATHER], "sometimes")
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strnig"}}}}}
    with pytest.raises(KvstrataError, match="strnig"):
        forced_tool_call_spec([bad], "required")
    bad_ref = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}
    with pytest.raises(KvstrataError, match="invalid tool parameters schema"):
        forced_tool_call_spec([bad_ref], {"type": "function", "function": {"name": "f"}})


def test_close_objects_only_where_properties_listed():
    s = {"type": "object", "properties": {"o": {"type": "object", "properties": {"x": {}}},
                                          "free": {"type": "object"},
                                          "open": {"properties": {"y": {}}, "additionalProperties": True}},
         "allOf": [{"properties": {"z": {}}}]}
    c = close_objects(s)
    assert c["properties"]["o"]["additionalProperties"] is False
    assert "additionalProperties" not in c["properties"]["free"]
    assert c["properties"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in c and "additionalProperties" not in c["allOf"][0]
    assert "additionalProperties" not in s["properties"]["o"]  # the input is not modified


# -- render_chat ------------------------------------------------------------------------------------
CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
]


def test_fallback_rendering_on_chatml():
    tok = _tok(CHATML_TEMPLATE)
    assert not template_supports_tools(tok)
    text = render_chat(tok, CONV, tools=[WEATHER])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are terse.\n\n# Tools")
    assert json.dumps(WEATHER) in system and "<tool_call></tool_call>" in system
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>" in text
    assert ('<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
            "<|im_end|>") in text
    assert ('<|im_start|>tool\n<tool_response>{"name": "get_weather", '
            '"content": "18C, sunny"}</tool_response><|im_end|>') in text
    assert text.endswith("<|im_start|>assistant\n")
    # call ids are random (new_call_id): the same conversation under other ids is the same prompt, so a
    # greedy agent run reproduces (an id in the prompt changed a BFCL job's transcript from its 3rd turn)
    other = json.loads(json.dumps(CONV).replace("call_1", new_call_id()))
    assert other != CONV and render_chat(tok, other, tools=[WEATHER]) == text
    none = render_chat(tok, CONV, tools=[WEATHER], tool_choice="none")
    assert "<tools>" not in none and "<tool_call>{" in none  # history still shown, tools not advertised
    no_sys = render_chat(tok, CONV[1:], tools=[WEATHER])
    assert no_sys.startswith("<|im_start|>system\n# Tools")


def test_native_template_gets_tools_and_dict_arguments():
    tok = _tok(NATIVE_TEMPLATE)
    assert template_supports_tools(tok)
    text = render_chat(tok, CONV, tools=[WEATHER, ADD])
    assert text.startswith("<|im_start|>system\nTOOLS:" + json.dumps(WEATHER))
    assert 'CALL get_weather {"city": "Paris"}' in text  # a dict, not a double-encoded string
    assert "<tool_call>" not in text
    assert "TOOLS" not in render_chat(tok, CONV, tools=[WEATHER], tool_choice="none")


@pytest.mark.parametrize("messages, msg", [
    ([], "non-empty"),
    ([{"role": "wizard", "content": "x"}], "role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "tool", "content": "x"}], "tool_call_id"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}], "function.name"),
])
def test_render_rejects_bad_messages(messages, msg):
    with pytest.raises(KvstrataError, match=msg):
        render_chat(_tok(CHATML_TEMPLATE), messages, tools=[WEATHER])


def test_render_rejects_named_choice_not_in_tools():
    with pytest.raises(KvstrataError, match="not in tools"):
        render_chat(_tok(CHATML_TEMPLATE), CONV[:2], tools=[WEATHER],
                    tool_choice={"type": "function", "function": {"name": "add"}})
