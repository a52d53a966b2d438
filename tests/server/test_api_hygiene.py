"""What every response promises, seen from outside: max_tokens past the context is a 400 naming the field,
error bodies always carry a `code` and name the request field in `param` (never pydantic's path), every
response has an `x-request-id` (the client's echoed), one access-log line per request, no machine path
in any output, and the tokens of a request aborted by its client are counted in /metrics."""

from __future__ import annotations

import logging
import re
import time

import httpx
import openai
import pytest

from tests.server.test_errors import assert_openai_error

MSGS = [{"role": "user", "content": "hi"}]


def _ctx(tiny_server) -> int:
    return tiny_server.state.engine.max_model_len


def test_max_tokens_past_the_context_is_400_naming_the_field(tiny_server, client):
    ctx = _ctx(tiny_server)
    for kw, param in (({"max_tokens": ctx}, "max_tokens"), ({"max_completion_tokens": ctx}, "max_completion_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MSGS, **kw)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == param
        assert str(ctx) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="hi", max_output_tokens=ctx, store=False)
    assert e.value.body["param"] == "max_output_tokens"
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": ctx})
    assert assert_openai_error(r, 400, "context_length_exceeded")["param"] == "max_tokens"
    # what fits still runs; a prompt near the end of the context gets completions' default 16 shrunk to fit
    ok = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens <= 4
    near = [1] * (ctx - 3)
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": "tiny", "prompt": near, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_anthropic_max_tokens_is_clamped_to_the_context(tiny_server):
    body = {"model": "tiny", "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0, "ignore_eos": True}
    r = httpx.post(tiny_server.url + "/v1/messages", json=body, timeout=120)
    assert r.status_code == 200
    u = r.json()["usage"]
    assert u["input_tokens"] + u.get("cache_read_input_tokens", 0) + u["output_tokens"] <= _ctx(tiny_server)


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": "tiny", "messages": MSGS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"model": "tiny", "messages": MSGS, "stop": 7}, "stop"),
    ({"messages": MSGS}, "model"),
])
def test_validation_errors_name_the_request_field(tiny_server, body, param):
    err = assert_openai_error(httpx.post(tiny_server.url + "/v1/chat/completions", json=body), 400, "invalid_request")
    assert err["param"] == param
    assert not re.search(r"body\.|literal\[|\bstr\b\.|function-", err["message"]), err["message"]


def test_every_error_has_a_code(tiny_server):
    u = tiny_server.url
    cases = [(httpx.get(u + "/v1/nowhere"), 404), (httpx.delete(u + "/v1/models"), 405),
             (httpx.post(u + "/v1/chat/completions", json={"model": "nope", "messages": MSGS}), 404),
             (httpx.post(u + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "logit_bias": {"1": 2}}), 400),
             (httpx.get(u + "/v1/sessions/sess_missing"), 404)]
    for r, status in cases:
        err = assert_openai_error(r, status)
        assert isinstance(err["code"], str) and err["code"], r.text


def test_request_id_on_every_response(tiny_server):
    u = tiny_server.url
    rs = [httpx.get(u + "/health"), httpx.get(u + "/v1/models"), httpx.get(u + "/v1/nowhere"),
          httpx.post(u + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "max_tokens": 2})]
    ids = [r.headers.get("x-request-id") for r in rs]
    assert all(ids) and len(set(ids)) == len(ids)
    mine = httpx.get(u + "/v1/models", headers={"x-request-id": "client-abc.123"})
    assert mine.headers["x-request-id"] == "client-abc.123"
    forged = httpx.get(u + "/v1/models", headers={"x-request-id": "a b INFO fake"})
    assert forged.headers["x-request-id"].startswith("req_")
    with httpx.stream("POST", u + "/v1/chat/completions", headers={"x-request-id": "stream-1"},
                      json={"model": "tiny", "messages": MSGS, "max_tokens": 2, "stream": True}) as r:
        assert r.headers["x-request-id"] == "stream-1"


def test_one_access_log_line_per_request(tiny_server):
    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    h, logger = Grab(), logging.getLogger("kvstrata.access")
    logger.addHandler(h)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        httpx.get(tiny_server.url + "/v1/models", headers={"x-request-id": "log-1"})
        httpx.post(tiny_server.url + "/v1/chat/completions", headers={"x-request-id": "log-2"},
                   json={"model": "tiny", "messages": [{"role": "nobody"}]})
        deadline = time.time() + 5
        while len([ln for ln in lines if "log-" in ln]) < 2 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)
    mine = [ln for ln in lines if "request_id=log-" in ln]
    assert len(mine) == 2
    assert re.fullmatch(r"GET /v1/models 200 [0-9.]+ms request_id=log-1", mine[0])
    assert re.fullmatch(r"POST /v1/chat/completions 400 [0-9.]+ms request_id=log-2", mine[1])


def test_no_machine_paths_in_api_output(tiny_server):
    u = tiny_server.url
    path = str(tiny_server.state.engine.model_path)
    for r in (httpx.get(u + "/v1/models"), httpx.get(u + "/v1/models/tiny"), httpx.get(u + "/health"),
              httpx.get(u + "/status/api/overview")):
        assert r.status_code == 200
        assert path not in r.text and not re.search(r'"/(tmp|home|root|usr|var)/', r.text), r.text


def _counter(tiny_server, name: str, labels: str = "") -> float:
    text = httpx.get(tiny_server.url + "/metrics").text
    m = re.search(rf"^{name}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_aborted_requests_tokens_are_counted(tiny_server, slow_steps):
    gen0 = _counter(tiny_server, "kvstrata_generation_tokens_total")
    prompt0 = _counter(tiny_server, "kvstrata_prompt_tokens_total")
    abort0 = _counter(tiny_server, "kvstrata_requests_finished_total", '{finish_reason="abort"}')
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(12)]
        assert sum(ln.startswith("data: ") for ln in got) >= 5
    deadline = time.time() + 20
    while _counter(tiny_server, "kvstrata_requests_finished_total", '{finish_reason="abort"}') == abort0:
        assert time.time() < deadline, "the aborted request was never counted"
        time.sleep(0.1)
    assert 4 <= _counter(tiny_server, "kvstrata_generation_tokens_total") - gen0 < 500
    assert _counter(tiny_server, "kvstrata_prompt_tokens_total") > prompt0
