"""The Anthropic Messages API through the official `anthropic` SDK against the real server: messages,
streaming (Anthropic's event types), a tool round trip, count_tokens, a session header that reuses the
conversation's KV, and Anthropic-shaped errors."""

from __future__ import annotations

import anthropic
import httpx
import pytest

WEATHER = {"name": "get_weather", "description": "weather for a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}


@pytest.fixture
def ac(tiny_server):
    return anthropic.Anthropic(base_url=tiny_server.url, api_key="none", max_retries=0, timeout=120)


def test_messages_and_usage(ac):
    r = ac.messages.create(model="tiny", max_tokens=12, system="You are terse.",
                           messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                                     {"role": "user", "content": [{"type": "text", "text": "Again"}]}],
                           extra_body={"temperature": 0, "ignore_eos": True})
    assert r.type == "message" and r.role == "assistant" and r.stop_reason == "max_tokens"
    assert r.content[0].type == "text" and r.content[0].text
    assert r.usage.output_tokens == 12 and r.usage.input_tokens > 10
    again = ac.messages.create(model="tiny", max_tokens=12, system="You are terse.",
                               messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                                         {"role": "user", "content": "Again"}], extra_body={"temperature": 0, "ignore_eos": True})
    assert again.content[0].text == r.content[0].text  # string and block content render alike
    assert again.usage.cache_read_input_tokens >= 16  # the repeated prompt came from the prefix cache
    n = ac.messages.count_tokens(model="tiny", system="You are terse.",
                                 messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                                           {"role": "user", "content": "Again"}])
    assert n.input_tokens == again.usage.input_tokens + again.usage.cache_read_input_tokens


def test_stop_sequence(ac):
    full = ac.messages.create(model="tiny", max_tokens=20, messages=[{"role": "user", "content": "Go"}],
                              extra_body={"temperature": 0, "ignore_eos": True}).content[0].text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 1)  # first seen after the start, so text comes before it
                if full[i:i + 2].isascii() and full[i:i + 2].isalpha() and full.find(full[i:i + 2]) == i)
    r = ac.messages.create(model="tiny", max_tokens=20, messages=[{"role": "user", "content": "Go"}],
                           stop_sequences=[stop], extra_body={"temperature": 0, "ignore_eos": True})
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == full[: full.index(stop)]


def test_stream_events(ac):
    # the random-weight model's greedy text can differ between a cold prompt and a cached one: warm it first
    ac.messages.create(model="tiny", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    with ac.messages.stream(model="tiny", max_tokens=16, messages=[{"role": "user", "content": "Hi"}],
                            extra_body={"temperature": 0, "ignore_eos": True}) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == 1 and kinds.count("content_block_stop") == 1
    assert kinds.count("content_block_delta") >= 3  # as generated
    whole = ac.messages.create(model="tiny", max_tokens=16, messages=[{"role": "user", "content": "Hi"}],
                               extra_body={"temperature": 0, "ignore_eos": True})
    assert final.content[0].text == whole.content[0].text and final.usage.output_tokens == 16


def test_tool_round_trip_streamed_and_in_a_session(ac, tiny_server):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(model="tiny", max_tokens=200, tools=[WEATHER], extra_body={"temperature": 0},
              tool_choice={"type": "tool", "name": "get_weather"})
    with ac.messages.stream(messages=msgs, **kw) as s:
        evs = list(s)
        streamed = s.get_final_message()
    frags = [e.delta.partial_json for e in evs if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(frags) >= 2 and streamed.stop_reason == "tool_use"
    r = ac.messages.create(messages=msgs, extra_headers={"X-Session-Id": "new"}, **kw)
    use = r.content[-1]
    assert r.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather"
    assert use.input == streamed.content[-1].input and isinstance(use.input["city"], str)
    # the client sends the whole conversation back with the result; the session appends only what is new
    raw = ac.messages.with_raw_response.create(messages=msgs, extra_headers={"X-Session-Id": "new"}, **kw)
    sid = raw.headers["x-session-id"]
    first = raw.parse()
    msgs2 = msgs + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[-1].id,
                                                  "content": "sunny, 18 C"}]}]
    raw2 = ac.messages.with_raw_response.create(model="tiny", max_tokens=8, tools=[WEATHER], extra_body={"temperature": 0},
                                                messages=msgs2, extra_headers={"X-Session-Id": sid})
    assert raw2.headers["x-session-id"] == sid  # the same durable session continued
    r2 = raw2.parse()
    assert r2.usage.cache_read_input_tokens >= first.usage.input_tokens + first.usage.cache_read_input_tokens - 16
    stored = httpx.get(f"{tiny_server.url}/v1/sessions/{sid}").json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert stored["messages"][1]["tool_calls"][0]["id"] == first.content[-1].id


def test_errors_have_anthropic_shape(ac, tiny_server):
    with pytest.raises(anthropic.NotFoundError) as e:
        ac.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "image" in e.value.body["error"]["message"]
    r = httpx.post(f"{tiny_server.url}/v1/messages", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.post(f"{tiny_server.url}/v1/messages", headers={"X-Session-Id": "sess_nope"},
                   json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_x_api_key_auth(tiny_engine, tmp_path):
    from kvstrata.sessions import open_store
    from tests.server.harness import serve

    store = open_store(tmp_path / "s.db")
    with serve(tiny_engine, store, api_keys=["k-alice"]) as srv:
        good = anthropic.Anthropic(base_url=srv.url, api_key="k-alice", max_retries=0)
        assert good.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "hi"}]).input_tokens > 0
        bad = anthropic.Anthropic(base_url=srv.url, api_key="k-mallory", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert e.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "incorrect API key provided"}}
    store.close()
