"""Constrained outputs through the API: json_schema / json_object and forced tool calls parse and validate
on every try, even from a random-weight model (the grammar, not the model, guarantees the shape)."""

from __future__ import annotations

import json

import jsonschema
import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "temp_c": {"type": "integer", "minimum": -50, "maximum": 60},
        "unit": {"enum": ["C", "F"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["city", "temp_c", "unit", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather for a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string", "maxLength": 10},
                                                                    "days": {"type": "integer", "minimum": 1,
                                                                             "maximum": 7}},
                                                     "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}}},
]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_chat_validates_every_time(client, seed):
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, temperature=1.0, seed=seed, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_object_and_responses_text_format(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0.7, seed=1, max_tokens=300,
                                       response_format={"type": "json_object"}, extra_body={"top_k": 20})
    if r.choices[0].finish_reason == "stop":  # a free-form object may run past max_tokens; if it ends, it parses
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    resp = client.responses.create(model="tiny", input="weather?", max_output_tokens=200, temperature=1.0,
                                   text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA,
                                                    "strict": True}})
    jsonschema.validate(json.loads(resp.output_text), SCHEMA)


def test_invalid_schema_is_400(client):
    import openai

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})


@pytest.mark.parametrize("seed", range(3))
def test_forced_named_tool_call_every_time(client, seed):
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=110,  # what the tools leave of the 1,024-token context
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) >= 1
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])


def test_required_tool_call_streamed(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                                 temperature=1.0, seed=5, max_tokens=110, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    first = deltas[0]  # id and name first, then the arguments in fragments
    assert first.id and first.function.name in ("get_weather", "get_time")
    args = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert len([d for d in deltas if d.function.arguments]) >= 2
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(args), spec[first.function.name])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
