"""Two replicas of the default model on a local Ray Serve cluster, driven through the ingress with the
unchanged openai client and plain HTTP, against a single-process server as the reference."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import openai
import pytest

from tests.cluster.conftest import decisions, served_by, session_turn, wait_replicas

pytestmark = pytest.mark.slow

SYSTEM = ("You are a careful assistant for a travel agency. Answer in one short sentence. Cities: Paris is the "
          "capital of France, Berlin of Germany, Madrid of Spain, Rome of Italy, Lisbon of Portugal, Vienna of "
          "Austria, Prague of Czechia, Warsaw of Poland, Budapest of Hungary, Athens of Greece.")
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}


def engine_cfg():
    from kvstrata.config import EngineConfig

    return EngineConfig(model="default", kv_device_bytes="64M", kv_host_bytes="32M", num_threads=1)


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    from kvstrata.cluster.launch import ClusterOptions

    d = ray_cluster(ClusterOptions(replicas=2, replica_cpus=0.5, imbalance=8), engine_cfg())
    wait_replicas(2)
    return d


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the same engine settings, no cluster."""
    from kvstrata.sessions import open_store
    from tests.server.harness import make_engine, serve

    aengine = make_engine("default", kv_device_bytes="64M", num_threads=1)
    store = open_store(str(tmp_path_factory.mktemp("single") / "s.db"))
    with serve(aengine, store, names=("default",)) as srv:
        yield srv
    aengine.shutdown()
    store.close()


def new_session(url: str, system: str = SYSTEM) -> str:
    r = httpx.post(url + "/v1/sessions", json={"system": system}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def chat(c, content: str, **kw):
    return c.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
        max_tokens=kw.pop("max_tokens", 24), temperature=kw.pop("temperature", 0), **kw)


def test_openai_routes_match_a_single_server(cluster, single):
    c, ref = cluster.client(), single.client()
    for q in ("What is the capital of Spain?", "Name the capital of Austria."):
        got, want = chat(c, q).parse(), chat(ref, q).parse()
        assert got.choices[0].message.content == want.choices[0].message.content
    stream = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Count to five."}],
                                       max_tokens=20, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    want = ref.chat.completions.create(model="default", messages=[{"role": "user", "content": "Count to five."}],
                                       max_tokens=20, temperature=0)
    assert text == want.choices[0].message.content and text
    got = c.completions.create(model="default", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert got.choices[0].text == ref.completions.create(model="default", prompt="The capital of France is",
                                                         max_tokens=8, temperature=0).choices[0].text
    call = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Weather in Rome?"}],
                                     tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                     max_tokens=40, temperature=0)
    assert call.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert c.models.list().data[0].id in ("tiny", "default")


def test_responses_continue_on_the_replica_holding_the_session(cluster, single):
    c = cluster.client()
    first = c.responses.with_raw_response.create(model="default", instructions=SYSTEM,
                                                 input="What is the capital of Italy?", max_output_tokens=16,
                                                 temperature=0)
    r1 = first.parse()
    second = c.responses.with_raw_response.create(model="default", previous_response_id=r1.id,
                                                  input="And of Greece?", max_output_tokens=16, temperature=0)
    assert served_by(second) == served_by(first)
    assert second.parse().usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens - 16
    ref = single.client()
    w1 = ref.responses.create(model="default", instructions=SYSTEM, input="What is the capital of Italy?",
                              max_output_tokens=16, temperature=0)
    w2 = ref.responses.create(model="default", previous_response_id=w1.id, input="And of Greece?",
                              max_output_tokens=16, temperature=0)
    assert (r1.output_text, second.parse().output_text) == (w1.output_text, w2.output_text)


def test_sessions_stick_and_sessionless_prompts_follow_their_prefix(cluster):
    before = decisions(cluster.metrics())
    sid = new_session(cluster.url)
    replicas = {served_by(session_turn(cluster.url, sid, q)) for q in ("Capital of Poland?", "And Hungary?",
                                                                         "And Czechia?")}
    assert len(replicas) == 1
    c = cluster.client()
    system = f"Ticket {uuid.uuid4().hex}. {SYSTEM}"  # a prefix no replica holds yet

    def ask(q):
        return c.chat.completions.with_raw_response.create(
            model="default", messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_tokens=8, temperature=0)

    owner = served_by(ask("Which city is the capital of Portugal?"))
    time.sleep(0.5)  # its KV events reach the ingress's index
    for q in ("Which city is the capital of Germany?", "Which city is the capital of France?"):
        assert served_by(ask(q)) == owner  # the shared system prompt's blocks live there
    after = decisions(cluster.metrics())
    gained = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert gained.get("engine/affinity", 0) >= 2 and gained.get("engine/prefix", 0) >= 2, gained


def _kill_replica_of(pid_by_replica: dict[str, int], replica: str) -> None:
    os.kill(pid_by_replica[replica], signal.SIGKILL)


def test_sigkill_between_turns_continues_from_the_shared_tier(cluster, single):
    pids = wait_replicas(2)
    system = f"Ticket {uuid.uuid4().hex}. {SYSTEM} Keep answers short; never invent cities."  # in no pool yet
    sid = new_session(cluster.url, system)
    turns = ["Which city is the capital of Greece?", "And Spain?"]
    t1 = session_turn(cluster.url, sid, turns[0], max_tokens=24)
    assert t1.status_code == 200, t1.text
    _kill_replica_of(pids, served_by(t1))
    time.sleep(1.0)  # the write-behind mover had milliseconds; the kill is a real SIGKILL all the same
    t2 = session_turn(cluster.url, sid, turns[1], max_tokens=24)
    assert t2.status_code == 200, t2.text
    assert served_by(t2) != served_by(t1)
    usage = t2.json()["usage"]
    from_shared = usage["prompt_tokens_details"]["cached_tokens_by_tier"].get("remote", 0)
    assert from_shared >= 0.8 * usage["prompt_tokens"], usage
    ref_sid = new_session(single.url, system)
    want = [session_turn(single.url, ref_sid, q, max_tokens=24).json()["message"]["content"] for q in turns]
    assert [t1.json()["message"]["content"], t2.json()["message"]["content"]] == want
    wait_replicas(2)  # Ray restarted the killed replica


def test_in_flight_request_on_a_killed_replica_is_retried_or_ends_retryable(cluster, single):
    pids = wait_replicas(2)
    c = cluster.client()
    pin = {"X-Session-Id": "retry-test"}  # affinity: the long request goes where the first one went
    owner = served_by(chat(c, "Warm the prefix up.", max_tokens=2, extra_headers=pin))
    long_q = "Write a long story about a train crossing Europe."
    # seeded and sampled: such a request gets no speculative drafts, so it decodes at the plain pace (greedy
    # text this long is drafted to ~2x and can end before the kill) and reproduces on any replica
    long_kw = dict(max_tokens=500, temperature=0.8, extra_body={"ignore_eos": True, "seed": 7})
    result: dict = {}

    def call() -> None:  # not streamed: nothing reaches the client before the end, so a death is retried
        result["resp"] = chat(c, long_q, extra_headers=pin, **long_kw)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(2.0)
    _kill_replica_of(pids, owner)
    t.join(300)
    resp = result["resp"]
    assert served_by(resp) != owner
    want = chat(single.client(), long_q, **long_kw).parse()
    assert resp.parse().choices[0].message.content == want.choices[0].message.content
    retries = [line for line in cluster.metrics().splitlines() if line.startswith("kvstrata_cluster_retries_total{")]
    assert retries and float(retries[0].split()[-1]) >= 1
    pids = wait_replicas(2)
    # streamed: once tokens reached the client, a dead replica ends the stream with a retryable error
    pin = {"X-Session-Id": "stream-test"}
    owner = served_by(chat(c, "Warm the prefix up.", max_tokens=2, extra_headers=pin))
    stream = c.chat.completions.create(model="default", messages=[{"role": "system", "content": SYSTEM},
                                                                  {"role": "user", "content": long_q}],
                                       max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True},
                                       extra_headers=pin)
    with pytest.raises(openai.APIError) as err:
        for i, _ in enumerate(stream):
            if i == 2:
                _kill_replica_of(pids, owner)
    assert "retry" in str(err.value)
    wait_replicas(2)
