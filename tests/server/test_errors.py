"""Errors in OpenAI's body format with OpenAI's status codes, seen through the official client."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.server.harness import make_engine, serve

MSGS = [{"role": "user", "content": "hi"}]


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_bad_json_is_400(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"Content-Type": "application/json"})
    err = assert_openai_error(r, 400)
    assert "JSON" in err["message"]


def test_validation_error_is_400_not_422(tiny_server, client):
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json={"model": "tiny", "messages": [], "n": 0})
    err = assert_openai_error(r, 400, "invalid_request")
    assert err["param"] in ("messages", "n")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_unknown_session_and_response_are_404(tiny_server, client):
    r = httpx.get(tiny_server.url + "/v1/sessions/sess_doesnotexist")
    assert_openai_error(r, 404, "session_not_found")
    r = httpx.post(tiny_server.url + "/v1/sessions/sess_doesnotexist/generate", json={})
    assert_openai_error(r, 404, "session_not_found")
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="tiny", input="hi", previous_response_id="resp_nope")
    assert e.value.body["code"] == "response_not_found"


def test_unknown_route_is_404_openai_body(tiny_server):
    assert_openai_error(httpx.get(tiny_server.url + "/v1/nothing"), 404)


def test_context_too_long_is_400(tiny_server, client):
    long = "The quick brown fox jumps over the lazy dog. " * 200  # far beyond the tiny model's 1024 tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # streaming: still a status code, before any event
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


def test_bad_tool_choice_and_response_format_are_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSGS, tool_choice="required")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSGS, response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}])


def test_api_keys(tiny_engine, tmp_path):
    from kvstrata.sessions import open_store

    store = open_store(tmp_path / "s.db")
    with serve(tiny_engine, store, api_keys=["k-alice", "k-bob"]) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # open
        for path in ("/v1/models", "/metrics", "/v1/sessions"):
            assert_openai_error(httpx.get(srv.url + path), 401, "missing_api_key")
        with pytest.raises(openai.AuthenticationError) as e:
            srv.client("k-mallory").chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
        alice, bob = srv.client("k-alice"), srv.client("k-bob")
        assert alice.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices
        # sessions: unguessable ids, and one key cannot see another key's sessions
        s = httpx.post(srv.url + "/v1/sessions", json={"system": "be brief"},
                       headers={"Authorization": "Bearer k-alice"}).json()
        assert s["id"].startswith("sess_") and len(s["id"]) >= 5 + 32
        h_bob = {"Authorization": "Bearer k-bob"}
        assert_openai_error(httpx.get(srv.url + f"/v1/sessions/{s['id']}", headers=h_bob), 404, "session_not_found")
        assert_openai_error(httpx.delete(srv.url + f"/v1/sessions/{s['id']}", headers=h_bob), 404)
        assert httpx.get(srv.url + "/v1/sessions", headers=h_bob).json()["data"] == []
        assert httpx.get(srv.url + f"/v1/sessions/{s['id']}", headers={"x-api-key": "k-alice"}).status_code == 200
        resp = alice.responses.create(model="tiny", input="hello", max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(model="tiny", input="more", previous_response_id=resp.id, max_output_tokens=2)
    store.close()


def test_queue_full_is_429_with_retry_after(tiny_llama, tmp_path):
    from kvstrata.sessions import open_store

    ae = make_engine(str(tiny_llama), max_num_seqs=1, max_waiting=1)
    store = open_store(tmp_path / "s.db")
    try:
        with serve(ae, store) as srv:
            c = srv.client()
            long = dict(model="tiny", messages=MSGS, max_tokens=400, extra_body={"ignore_eos": True}, stream=True)
            running = c.chat.completions.create(**long)  # admitted: holds the only running slot
            next(iter(running))
            results = {}

            def waiter():  # queued behind it: the one waiting slot
                results["waiter"] = list(c.chat.completions.create(**{**long, "max_tokens": 2}))

            t = threading.Thread(target=waiter)
            t.start()
            deadline = time.time() + 30
            while ae.num_waiting < 1 and time.time() < deadline:
                time.sleep(0.01)
            assert ae.num_waiting == 1
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["code"] == "queue_full" and e.value.body["type"] == "rate_limit_error"
            running.close()  # the client goes away: its slot frees, the waiter runs
            t.join(60)
            assert results["waiter"][-1].choices[0].finish_reason == "length"
    finally:
        ae.shutdown()
        store.close()


def test_extreme_sampling_values_never_break_the_engine(tiny_server):
    """Found by the fuzz test: a seed beyond int64, a temperature whose inverse overflows, a tiny
    repetition penalty. Each is a 400 or a normal answer; the engine thread stays alive."""
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, status in [({"seed": 2**70}, 400), ({"seed": -(2**70)}, 400), ({"temperature": 1e-300}, 200),
                          ({"repetition_penalty": 1e-300}, 400)]:
        r = httpx.post(tiny_server.url + "/v1/chat/completions", json={**base, **extra}, timeout=60)
        assert r.status_code == status, (extra, r.text)
        if status == 400:
            assert_openai_error(r, 400)
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"
