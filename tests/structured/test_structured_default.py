"""Constrained decoding and tool calling on the default model (SmolLM2-135M-Instruct, vocab 49,152).

All generation runs as one batch in a module fixture (a handful of sequences, ~70 decode steps), so
the module costs one model load and one short batched run.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kvstrata import LLM
from kvstrata.core import FinishReason, SamplingParams
from kvstrata.tokenizer.tools import (
    forced_tool_call_spec,
    parse_tool_calls,
    render_chat,
    template_supports_tools,
)

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "species": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                   "city": {"type": "string", "maxLength": 30}},
                  "required": ["name", "city"]},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "species", "age", "owner", "toys"],
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def llm():
    return LLM("default", kv_device_bytes="512M")


@pytest.fixture(scope="module")
def results(llm):
    tok = llm.tokenizer
    pet = render_chat(tok, [{"role": "user", "content": "Describe a pet as JSON: name, species, age, owner, toys."}])
    ask = render_chat(tok, [{"role": "user", "content": "What's the weather in Paris, in celsius?"}], TOOLS, "required")
    phone = render_chat(tok, [{"role": "user", "content": "Give me a phone number."}])
    jobs = {
        "schema": [(pet, SamplingParams(temperature=1.0, seed=s, max_tokens=100,
                                        structured={"type": "json_schema", "schema": PET, "strict": True}))
                   for s in range(2)],
        "required": [(ask, SamplingParams(temperature=1.0, seed=s, max_tokens=80,
                                          structured=forced_tool_call_spec(TOOLS, "required"))) for s in range(2)],
        "named": [(ask, SamplingParams(temperature=1.0, seed=s, max_tokens=80,
                                       structured=forced_tool_call_spec(TOOLS, NAMED))) for s in range(2)],
        "regex": [(phone, SamplingParams(temperature=0.0, max_tokens=20,
                                         structured={"type": "regex", "pattern": r"\d{3}-\d{4}"}))],
        "cut": [(pet, SamplingParams(temperature=0.0, max_tokens=8,
                                     structured={"type": "json_schema", "schema": PET}))],
    }
    flat = [j for js in jobs.values() for j in js]
    outs = [r.outputs[0] for r in llm.generate([p for p, _ in flat], [sp for _, sp in flat])]
    res, i = {}, 0
    for k, js in jobs.items():
        res[k], i = outs[i:i + len(js)], i + len(js)
    return res


def test_json_schema_validates(results):
    for o in results["schema"]:
        assert o.finish_reason == FinishReason.STOP, o.text
        obj = json.loads(o.text)
        jsonschema.validate(obj, PET)
        assert set(obj["owner"]) == {"name", "city"}


@pytest.mark.parametrize("kind", ["required", "named"])
def test_forced_tool_calls_parse_and_validate(results, kind):
    for o in results[kind]:
        assert o.finish_reason == FinishReason.STOP, o.text
        content, calls = parse_tool_calls(o.text)
        assert content is None and len(calls) == 1, o.text
        f = calls[0]["function"]
        assert f["name"] in SCHEMAS and (kind == "required" or f["name"] == "get_weather")
        jsonschema.validate(json.loads(f["arguments"]), SCHEMAS[f["name"]])


def test_regex_digits_are_ascii(results):
    # \d means [0-9] here (the Rust regex default would allow any Unicode digit, and this model picks some)
    (o,) = results["regex"]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", o.text), o.text
    assert o.finish_reason == FinishReason.STOP


def test_cut_mid_json_reports_length(results):
    (o,) = results["cut"]
    assert o.finish_reason == FinishReason.LENGTH and len(o.token_ids) == 8
    assert o.text.startswith('{"name": "')
    with pytest.raises(json.JSONDecodeError):
        json.loads(o.text)


def test_render_chat_round_trip_on_default_template(llm):
    tok = llm.tokenizer
    assert not template_supports_tools(tok)  # SmolLM2's template has no tools: the fallback format is used
    conv = [
        {"role": "user", "content": "Weather in Paris, and 2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "5"},
    ]
    text = render_chat(tok, conv, TOOLS)
    turns = re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", text, re.DOTALL)
    assert [r for r, _ in turns] == ["system", "user", "assistant", "tool", "tool"]
    assert "<tools>" in turns[0][1] and all(json.dumps(t) in turns[0][1] for t in TOOLS)
    # the assistant turn parses back into the same calls
    content, calls = parse_tool_calls(turns[2][1])
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 2, "b": 3})]
    responses = [json.loads(re.fullmatch(r"<tool_response>(.*)</tool_response>", c, re.DOTALL).group(1))
                 for _, c in turns[3:]]
    assert responses == [{"name": "get_weather", "content": "18C, sunny"}, {"name": "add", "content": "5"}]
    assert text.endswith("<|im_start|>assistant\n")
    # the whole prompt tokenizes with the special tokens intact
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 6
