"""The OpenAI routes driven by the official `openai` client, unchanged, on a tiny random-weight model."""

from __future__ import annotations

import math

import httpx
import pytest

MSGS = [{"role": "user", "content": "The quick brown fox"}]


def test_models_and_health(tiny_server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    r = httpx.get(tiny_server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_non_stream_matches_engine_greedy(tiny_server, client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    # the same prompt through the engine directly: an independent path to the same greedy text
    from kvstrata.core import SamplingParams

    tok = tiny_server.state.tokenizer
    ids = tok.encode_chat(MSGS)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == len(ids) + r.usage.completion_tokens

    def direct(engine):
        rid = engine.add_request(ids, SamplingParams(max_tokens=8))
        while True:
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    return out.outputs[0].text

    assert c.message.content == tiny_server.engine_call(direct)


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].choices == [] and chunks[-1] is usage[0]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert usage[0].usage.completion_tokens >= 1
    whole = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    assert text == whole.choices[0].message.content
    assert whole.usage.completion_tokens == usage[0].usage.completion_tokens


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_n_greater_than_one_with_seed(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=10, temperature=1.0, n=3, seed=7, logprobs=True)
    r = client.chat.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    # usage counts the tokens of every choice
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_n_stream_every_index_finishes(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, n=2, stream=True,
                                                 temperature=0.8, seed=1))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_string_cuts_output(client):
    base = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0)
    text = base.choices[0].message.content
    if len(text) < 4:
        pytest.skip("greedy output too short to cut")
    stop = text[2:4]
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for t in lp:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert math.isclose(t.logprob, t.top_logprobs[0].logprob, rel_tol=1e-5, abs_tol=1e-6)


def test_extension_fields_accepted(client):
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, max_completion_tokens=6, temperature=0.7, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=0.5, user="u1",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "request_class": "batch"})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_completions_non_stream_and_stream(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_many_prompts_token_ids_echo_logprobs(tiny_server, client):
    r = client.completions.create(model="tiny", prompt=["Paris is", "The quick"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    ids = [50, 60, 70, 80]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=2, echo=True)
    c = r2.choices[0]
    assert r2.usage.prompt_tokens == 4
    assert len(c.logprobs.tokens) == r2.usage.completion_tokens
    echoed = tiny_server.state.tokenizer.decode(ids)
    assert c.text.startswith(echoed) and c.logprobs.text_offset[0] == len(echoed)
    assert all(1 <= len(top) <= 2 for top in c.logprobs.top_logprobs)  # equal strings share a key


def test_metrics_after_traffic(tiny_server, client):
    client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    text = httpx.get(tiny_server.url + "/metrics").text
    for name in ("kvstrata_http_requests_total", "kvstrata_prompt_tokens_total", "kvstrata_generation_tokens_total",
                 "kvstrata_time_to_first_token_seconds_bucket", "kvstrata_requests_waiting",
                 "kvstrata_kv_blocks", "kvstrata_cached_prompt_tokens_total"):
        assert name in text, name
    line = next(l for l in text.splitlines()
                if l.startswith("kvstrata_http_requests_total{") and '"/v1/chat/completions"' in l and '"200"' in l)
    assert float(line.split()[-1]) >= 1
