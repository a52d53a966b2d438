"""The /v1/sessions extension and the stateful Responses API (previous_response_id)."""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import openai
import pytest


from kvstrata.core import chain_keys


@pytest.fixture
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=120) as c:
        yield c


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def test_session_lifecycle_and_prefix_reuse(tiny_server, http):
    s = ok(http.post("/v1/sessions", json={"system": "You are terse.", "class": "batch", "metadata": {"k": 1}}))
    sid = s["id"]
    assert s["state"] == "active" and s["class"] == "batch" and s["num_messages"] == 0
    g1 = ok(http.post(f"/v1/sessions/{sid}/generate", json={
        "messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}],
        "max_tokens": 8, "temperature": 0}))
    assert g1["message"]["role"] == "assistant" and g1["session"]["num_messages"] == 2
    p1 = g1["usage"]["prompt_tokens"]
    assert g1["session"]["num_tokens"] == p1 + g1["usage"]["completion_tokens"]
    # a user turn appended without generating, then the next turn
    ok(http.post(f"/v1/sessions/{sid}/messages", json={"messages": [{"role": "user", "content": "Once upon a time"}]}))
    g2 = ok(http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 8, "temperature": 0}))
    u2 = g2["usage"]
    assert u2["prompt_tokens"] > p1
    # the second turn's prompt starts with the first turn's prompt and generated tokens, so the engine's
    # prefix cache serves at least every full block of that
    bs = tiny_server.state.engine.pool.block_size
    assert u2["prompt_tokens_details"]["cached_tokens"] >= (g1["session"]["num_tokens"] // bs) * bs - bs
    assert u2["prompt_tokens_details"]["cached_tokens"] > 0
    full = ok(http.get(f"/v1/sessions/{sid}", params={"include_tokens": True}))
    assert [m["role"] for m in full["messages"]] == ["user", "assistant", "user", "assistant"]
    assert full["system"] == "You are terse." and full["metadata"] == {"k": 1}
    assert full["messages"][1]["content"] == g1["message"]["content"]
    # the stored token ids are exactly what the engine saw, and the key chain is theirs
    toks = full["token_ids"]
    assert len(toks) == full["num_tokens"] == u2["prompt_tokens"] + u2["completion_tokens"]
    assert full["num_blocks"] == len(chain_keys(toks, bs, tiny_server.state.engine.fingerprint))
    tok = tiny_server.state.tokenizer
    assert tok.decode(toks, skip_special_tokens=False).startswith(
        tok.apply_chat_template([{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]))
    listed = ok(http.get("/v1/sessions", params={"limit": 1000}))
    assert sid in [x["id"] for x in listed["data"]]
    ok(http.delete(f"/v1/sessions/{sid}"))
    assert http.get(f"/v1/sessions/{sid}").status_code == 404


def test_fork_shares_prefix(http):
    sid = ok(http.post("/v1/sessions", json={"system": "sys"}))["id"]
    ok(http.post(f"/v1/sessions/{sid}/generate", json={
        "messages": [{"role": "user", "content": "Paris is the capital of France. " * 4}], "max_tokens": 4,
        "temperature": 0}))
    f = ok(http.post(f"/v1/sessions/{sid}/fork", json={"metadata": {"branch": "b"}}))
    assert f["parent_id"] == sid and f["num_messages"] == 2 and f["metadata"]["branch"] == "b"
    g = ok(http.post(f"/v1/sessions/{f['id']}/generate", json={
        "messages": [{"role": "user", "content": "more"}], "max_tokens": 4, "temperature": 0}))
    assert g["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    assert ok(http.get(f"/v1/sessions/{sid}"))["num_messages"] == 2  # the parent is unchanged


def test_tool_results_appended_and_state(http):
    tools = [{"type": "function", "function": {"name": "get_time", "description": "current time",
                                               "parameters": {"type": "object", "properties": {}}}}]
    sid = ok(http.post("/v1/sessions", json={"tools": tools}))["id"]
    g = ok(http.post(f"/v1/sessions/{sid}/generate", json={
        "messages": [{"role": "user", "content": "What time is it?"}], "tool_choice": "required", "max_tokens": 64,
        "temperature": 0}))
    assert g["finish_reason"] == "tool_calls"
    call = g["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_time" and g["session"]["state"] == "waiting_on_tool"
    s = ok(http.post(f"/v1/sessions/{sid}/messages", json={"messages": [
        {"role": "tool", "tool_call_id": call["id"], "content": "12:00"}]}))
    assert s["state"] == "active" and s["num_messages"] == 3
    g2 = ok(http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 4, "tool_choice": "none"}))
    assert g2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert http.post(f"/v1/sessions/{sid}/messages", json={"messages": [{"role": "tool", "content": "x"}]}
                     ).status_code == 400  # a tool result must name its call


def test_park_without_tiers_is_400(http):
    sid = ok(http.post("/v1/sessions", json={}))["id"]
    ok(http.post(f"/v1/sessions/{sid}/generate", json={"messages": [{"role": "user", "content": "hello"}],
                                                         "max_tokens": 2}))
    r = http.post(f"/v1/sessions/{sid}/park", json={"tier": "host"})
    assert r.status_code == 400 and "tier" in r.json()["error"]["message"]
    assert ok(http.get(f"/v1/sessions/{sid}"))["state"] == "active"  # nothing recorded


def test_park_resume_with_host_tier(tiny_llama, tmp_path):
    import asyncio

    from kvstrata.sessions import open_store
    from tests.server.harness import make_engine, serve

    ae = make_engine(str(tiny_llama), kv_host_bytes="8M")
    store = open_store(tmp_path / "s.db")
    try:
        with serve(ae, store) as srv, httpx.Client(base_url=srv.url, timeout=60) as h:
            sid = ok(h.post("/v1/sessions", json={"system": "You are a test."}))["id"]
            g = ok(h.post(f"/v1/sessions/{sid}/generate", json={
                "messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 3}],
                "max_tokens": 8, "temperature": 0}))
            full = (g["session"]["num_tokens"] // 16) * 16
            p = ok(h.post(f"/v1/sessions/{sid}/park", json={"tier": "host", "lease_s": 600}))
            assert p["state"] == "parked" and p["parked_tier"] == "host" and p["lease_expires_at"] > 0
            assert p["kv"]["moved"] and p["kv"]["tokens"] == full and p["kv"]["device_blocks_freed"] > 0
            loc = ok(h.get(f"/v1/sessions/{sid}", params={"locate": True}))["kv_location"]
            assert loc.get("host", 0) == full and loc.get("device", 0) == 0, loc
            r = ok(h.post(f"/v1/sessions/{sid}/resume"))
            assert r["state"] == "active" and r["parked_tier"] is None and r["kv"]["prefetched_tokens"] == full
            g2 = ok(h.post(f"/v1/sessions/{sid}/generate", json={
                "messages": [{"role": "user", "content": "more"}], "max_tokens": 2, "temperature": 0}))
            assert g2["usage"]["prompt_tokens_details"]["cached_tokens"] >= full
            bad = h.post(f"/v1/sessions/{sid}/park", json={"tier": "disk"})  # not configured here
            assert bad.status_code == 400 and "disk" in bad.json()["error"]["message"]
            # a lease that ends is swept: the lease is cleared (the KV unpinned), the session stays parked
            ok(h.post(f"/v1/sessions/{sid}/park", json={"tier": "host", "lease_s": 0.01}))
            time.sleep(0.05)
            assert asyncio.run(srv.state.skv.sweep_leases()) >= 1
            s = ok(h.get(f"/v1/sessions/{sid}"))
            assert s["state"] == "parked" and s["lease_expires_at"] is None
    finally:
        ae.shutdown()
        store.close()


def test_closed_or_bad_requests(http):
    assert http.post("/v1/sessions", json={"class": "urgent"}).status_code == 400
    assert http.post("/v1/sessions", json={"tools": [{"type": "web"}]}).status_code == 400
    sid = ok(http.post("/v1/sessions", json={}))["id"]
    assert http.post(f"/v1/sessions/{sid}/park", json={"tier": "moon"}).status_code == 400
    assert http.post(f"/v1/sessions/{sid}/messages", json={"messages": []}).status_code == 400


def test_responses_previous_response_id(tiny_server):
    c = tiny_server.client()
    r1 = c.responses.create(model="tiny", input="The quick brown fox jumps over the lazy dog.",
                            instructions="Answer briefly.", max_output_tokens=6, temperature=0)
    assert r1.id.startswith("resp_") and r1.status in ("completed", "incomplete")
    assert r1.usage.input_tokens > 0 and r1.output[0].type == "message"
    r2 = c.responses.create(model="tiny", input="Once upon a time", previous_response_id=r1.id,
                            max_output_tokens=6, temperature=0)
    # only the new input was sent, yet the prompt holds the whole history, served from the prefix cache
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens
    assert r2.usage.input_tokens_details.cached_tokens >= 16
    body = r2.model_dump()
    sid = body["session_id"]
    s = httpx.get(f"{tiny_server.url}/v1/sessions/{sid}").json()
    assert [m["role"] for m in s["messages"]] == ["user", "assistant", "user", "assistant"]
    assert s["messages"][1]["content"] == r1.output_text and s["system"] == "Answer briefly."
    assert c.responses.retrieve(r2.id).output_text == r2.output_text
    # continuing from the older response branches: the session keeps its history, a new one forks off
    r3 = c.responses.create(model="tiny", input="Paris", previous_response_id=r1.id, max_output_tokens=4,
                            temperature=0)
    b = r3.model_dump()
    assert b["session_id"] != sid and b["branched_from"] == sid
    assert r3.usage.input_tokens_details.cached_tokens >= 16
    assert len(httpx.get(f"{tiny_server.url}/v1/sessions/{sid}").json()["messages"]) == 4
    # store=False: nothing written, nothing to continue from
    r4 = c.responses.create(model="tiny", input="hi", store=False, max_output_tokens=2)
    import openai

    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="tiny", input="x", previous_response_id=r4.id)


TIME_TOOL = {"type": "function", "name": "get_time", "description": "The current time.",  # an enum: a short call
             "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
                            "required": ["tz"]}}


def _events(stream) -> list:
    evs = list(stream)
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    return evs


def test_responses_stream_text_then_continue(tiny_server):
    """stream=true: the Responses event sequence, text deltas that add up to the stored text, the id
    announced by response.created stored as the session's turn and continued like any other."""
    c = tiny_server.client()
    evs = _events(c.responses.create(model="tiny", input="The quick brown fox jumps over the lazy dog.",
                                     max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in evs]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # 12 tokens, ignore_eos-free: the budget runs out first
    deltas = [e for e in evs if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2  # streamed as generated, not in one piece
    text = "".join(d.delta for d in deltas)
    assert text and evs[-4].text == text and {d.item_id for d in deltas} == {evs[2].item.id}
    final = evs[-1].response
    assert final.id == evs[0].response.id and final.output_text == text and final.usage.output_tokens == 12
    assert final.incomplete_details.reason == "max_output_tokens"
    # the same turn, non-streamed, gives the same text (greedy), and the stored response is retrievable
    assert c.responses.retrieve(final.id).output_text == text
    r2 = c.responses.create(model="tiny", input="Once upon a time", previous_response_id=final.id,
                            max_output_tokens=4, temperature=0)
    assert r2.usage.input_tokens_details.cached_tokens >= 16
    sid = final.model_dump()["session_id"]
    assert [m["role"] for m in httpx.get(f"{tiny_server.url}/v1/sessions/{sid}").json()["messages"]] == \
        ["user", "assistant", "user", "assistant"]


def test_responses_stream_function_call(tiny_server):
    c = tiny_server.client()
    evs = _events(c.responses.create(model="tiny", input="What time is it?", tools=[TIME_TOOL], tool_choice="required",
                                     parallel_tool_calls=False, max_output_tokens=64, temperature=0, stream=True))
    kinds = [e.type for e in evs]
    assert "response.output_text.delta" not in kinds  # a forced call: no text
    i = kinds.index("response.function_call_arguments.done")
    a = kinds.index("response.output_item.added")
    assert set(kinds[a + 1:i]) == {"response.function_call_arguments.delta"} and i - a - 1 >= 2  # in fragments
    assert kinds[i + 1] == "response.output_item.done"
    call = evs[i + 1].item
    assert evs[a].item.call_id == call.call_id and evs[a].item.name == "get_time"  # announced first
    assert call.type == "function_call" and call.name == "get_time" and json.loads(call.arguments)["tz"] in ("UTC", "CET")
    assert evs[i].arguments == call.arguments == "".join(e.delta for e in evs[a + 1:i])
    assert kinds[-1] == "response.completed" and evs[-1].response.output[-1].call_id == call.call_id
    # the call's output continues the stored session
    r2 = c.responses.create(model="tiny", previous_response_id=evs[-1].response.id, max_output_tokens=4,
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}])
    assert r2.status in ("completed", "incomplete")


def test_responses_stream_errors_and_store_false(tiny_server):
    c = tiny_server.client()
    long = "The quick brown fox jumps over the lazy dog. " * 200
    with pytest.raises(openai.BadRequestError) as e:  # before any event: still an HTTP status
        c.responses.create(model="tiny", input=long, stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    evs = _events(c.responses.create(model="tiny", input="hi", store=False, max_output_tokens=3, stream=True))
    assert evs[-1].type in ("response.completed", "response.incomplete")
    with pytest.raises(openai.NotFoundError):  # store=false: nothing written
        c.responses.retrieve(evs[-1].response.id)


def test_responses_stream_disconnect_stores_nothing(tiny_server):
    in_use = lambda: tiny_server.engine_call(lambda e: e.pool.summary()["in_use"])  # noqa: E731
    body = {"model": "tiny", "input": "tell a long story " * 20, "max_output_tokens": 600, "stream": True,
            "text": {"format": {"type": "text"}}}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", tiny_server.url + "/v1/responses", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            created = json.loads(next(x for x in lines if x.startswith("data: "))[6:])
            rid, sid = created["response"]["id"], created["response"]["session_id"]
            next(x for x in lines if "response.output_text.delta" in x)
    deadline = time.time() + 20
    while in_use() != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert in_use() == 0 and tiny_server.engine_call(lambda e: len(e.requests)) == 0
    assert httpx.get(f"{tiny_server.url}/v1/responses/{rid}").status_code == 404
    assert httpx.get(f"{tiny_server.url}/v1/sessions/{sid}").json()["messages"] == []


def test_responses_stream_through_the_sdk_stream_helper(tiny_server):
    """The openai SDK's `responses.stream` rebuilds the response from the events and checks them (one
    response id throughout, items matched by index and id): ours pass it, for text cut by the budget
    (response.incomplete) and for a completed function call (get_final_response)."""
    c = tiny_server.client()
    with c.responses.stream(model="tiny", input="The quick brown fox", max_output_tokens=8, temperature=0) as s:
        evs = list(s)
    text = "".join(e.delta for e in evs if e.type == "response.output_text.delta")
    assert evs[-1].type == "response.incomplete" and evs[-1].response.output_text == text != ""
    with c.responses.stream(model="tiny", input="What time is it?", tools=[TIME_TOOL], tool_choice="required",
                            parallel_tool_calls=False, max_output_tokens=64) as s:
        final = s.get_final_response()
    call = final.output[-1]
    assert final.status == "completed" and call.type == "function_call" and call.name == "get_time"
    assert json.loads(call.arguments)["tz"] in ("UTC", "CET")


def test_requests_are_scheduled_by_the_program_they_belong_to(tiny_server, http):
    """The engine orders waiting work by agent program (least attained service): a session turn counts
    for its session, a chat request for its X-Session-Id header or its prompt_cache_key."""
    attained = tiny_server.state.aengine.call(lambda e: e.scheduler.attained).result(30)
    sid = ok(http.post("/v1/sessions", json={"system": "You are terse."}))["id"]
    ok(http.post(f"/v1/sessions/{sid}/generate", json={"messages": [{"role": "user", "content": "Hello there"}],
                                                        "max_tokens": 2, "temperature": 0}))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 2}
    ok(http.post("/v1/chat/completions", json=chat, headers={"X-Session-Id": "agent-header-7"}))
    ok(http.post("/v1/chat/completions", json={**chat, "prompt_cache_key": "agent-key-8"}))
    for program in (sid, "agent-header-7", "agent-key-8"):
        assert attained.get(program, 0) > 0, (program, list(attained)[-5:])


def test_completions_of_a_program_pause_between_requests_and_keep_their_output(tiny_server, http):
    """Plain completions naming a program (X-Session-Id) pause like session turns: the finished request's
    sequence is paused as a branch of the program, the program's next request resumes it; greedy output
    is the same as without the header, and a request without one pauses nothing (--program-pause; off
    by default)."""
    skv = tiny_server.state.skv
    eng = tiny_server.state.aengine.engine
    cfg = eng.config
    eng.config = dataclasses.replace(cfg, program_pause=True)
    try:
        _program_pauses(skv, http)
    finally:
        eng.config = cfg


def _program_pauses(skv, http) -> None:
    prompt = list(range(200, 280))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    before = dict(skv.counters)
    plain = ok(http.post("/v1/completions", json=body))
    assert skv.counters["program_pauses"] == before["program_pauses"]
    first = ok(http.post("/v1/completions", json=body, headers={"X-Session-Id": "agent-completions-1"}))
    deadline = time.monotonic() + 10
    while skv.counters["program_pauses"] == before["program_pauses"] and time.monotonic() < deadline:
        time.sleep(0.05)  # paused off the reply's path
    assert skv.counters["program_pauses"] == before["program_pauses"] + 1
    turn2 = {**body, "prompt": prompt + list(range(300, 320))}
    second = ok(http.post("/v1/completions", json=turn2, headers={"X-Session-Id": "agent-completions-1"}))
    assert skv.counters["program_resumes"] == before["program_resumes"] + 1
    assert first["choices"][0]["text"] == plain["choices"][0]["text"]
    again = ok(http.post("/v1/completions", json=turn2))
    assert second["choices"][0]["text"] == again["choices"][0]["text"]
