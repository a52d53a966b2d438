"""The tool-calling round trip on the default model (SmolLM2-135M-Instruct), real text, through the
official client: the model is made to ask for a tool (a forced call, so the test is deterministic), the
client runs the tool and sends the result back, and the model answers from it."""

from __future__ import annotations

import json

import pytest


pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city name"}},
                   "required": ["city"], "additionalProperties": False}}}


def test_tool_call_round_trip(default_server):
    c = default_server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r1 = c.chat.completions.create(model="default", messages=messages, tools=[WEATHER], temperature=0,
                                   max_tokens=40, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r1.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and "paris" in args["city"].lower()
    # the client runs the tool and sends the call and its result back
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"city": "Paris", "temperature_c": 18, "condition": "sunny"})})
    r2 = c.chat.completions.create(model="default", messages=messages, tools=[WEATHER], temperature=0,
                                   max_tokens=40)
    answer = r2.choices[0].message.content or ""
    assert r2.choices[0].finish_reason in ("stop", "length") and not r2.choices[0].message.tool_calls
    assert answer.strip()
    # The 135M model tends to echo the fallback `<tool_response>` block instead of using it (measured:
    # greedy answers start with that tag), so only the round trip itself is asserted: the result
    # reached the prompt, which now holds the first request's prompt, the call and the result.
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + r1.usage.completion_tokens
    # the second request repeats the first one's prompt: the prefix cache serves it
    assert r2.usage.prompt_tokens_details.cached_tokens >= 16


def test_session_round_trip_reuses_kv(default_server):
    import httpx

    url = default_server.url
    sid = httpx.post(url + "/v1/sessions", json={"tools": [WEATHER], "class": "batch"}).json()["id"]
    g1 = httpx.post(url + f"/v1/sessions/{sid}/generate", timeout=120, json={
        "messages": [{"role": "user", "content": "What is the weather in Tokyo?"}], "temperature": 0,
        "max_tokens": 40, "tool_choice": "required"}).json()
    call = g1["message"]["tool_calls"][0]
    assert g1["finish_reason"] == "tool_calls" and "tokyo" in json.loads(call["function"]["arguments"])["city"].lower()
    g2 = httpx.post(url + f"/v1/sessions/{sid}/generate", timeout=120, json={
        "messages": [{"role": "tool", "tool_call_id": call["id"], "content": "rainy, 12 C"}], "temperature": 0,
        "max_tokens": 30}).json()
    assert g2["message"]["content"]
    # everything before the tool result (the tools section, the question, the call) came from the cache
    assert g2["usage"]["prompt_tokens_details"]["cached_tokens"] >= g1["usage"]["prompt_tokens"] - 16


def test_parse_strict_schema_closes(default_server):
    # chat.completions.parse raises when the output stops on the length limit; bounded numbers and the
    # compact layout make the strict schema close well before it
    from pydantic import BaseModel

    class Measurement(BaseModel):
        city: str
        temperature_c: float
        year: int

    c = default_server.client()
    r = c.chat.completions.parse(model="default", max_tokens=200, temperature=0, response_format=Measurement,
                                 messages=[{"role": "user", "content": "Paris had 21.5 degrees C in 2023. As JSON."}])
    m = r.choices[0].message.parsed
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 100
    assert isinstance(m, Measurement) and m.city


def test_streamed_tool_call_equals_non_streamed(default_server):
    c = default_server.client()
    kw = dict(model="default", messages=[{"role": "user", "content": "What is the weather in Paris right now?"}],
              tools=[WEATHER], temperature=0, max_tokens=40,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    deltas = [tc for ch in c.chat.completions.create(stream=True, **kw) if ch.choices
              for tc in (ch.choices[0].delta.tool_calls or [])]
    frags = [d.function.arguments for d in deltas if d.function.arguments]
    assert deltas[0].function.name == "get_weather" and len(frags) > 1
    assert "".join(frags) == whole.function.arguments and "paris" in json.loads(whole.function.arguments)["city"].lower()
