import json
import time

import pytest

from benchmarks.peers.http_load import load, percentiles, synthetic_prompt
from benchmarks.peers.tests.fake_server import FakeServer


def test_percentiles_nearest_rank():
    vals = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(vals) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles([0.007])["p99"] == 7.0


def test_synthetic_prompts_reproducible_and_distinct():
    assert synthetic_prompt(3, 50) == synthetic_prompt(3, 50)
    assert synthetic_prompt(3, 50) != synthetic_prompt(4, 50)
    assert len(synthetic_prompt(0, 50).split()) == 50 + 5


def test_load_counts_tokens_and_latencies():
    with FakeServer(delay_s=0.02) as srv:
        res = load(srv.url, concurrency=3, num_requests=7, max_tokens=5, prompt_words=10)
        bodies = list(srv.requests)
    assert (res.requests, res.ok, res.errors) == (7, 7, [])
    assert res.completion_tokens == 7 * 5
    assert all(b["stream"] and b["max_tokens"] == 5 and b["ignore_eos"] for b in bodies)
    assert len({json.dumps(b["messages"]) for b in bodies}) == 7  # one distinct prompt per request
    # first chunk after one server delay; gaps of about one delay between chunks
    assert res.ttft_ms["p50"] >= 15
    assert 15 <= res.itl_ms["p50"] < 500
    assert res.tokens_per_s == pytest.approx(35 / res.wall_s, rel=0.01)


def test_load_without_usage_counts_chunks_and_reports_errors():
    with FakeServer(delay_s=0.0, send_usage=False) as srv:
        res = load(srv.url, concurrency=2, num_requests=4, max_tokens=3, prompt_words=5, ignore_eos=False)
        assert "ignore_eos" not in srv.requests[0]
    assert res.ok == 4 and res.completion_tokens == 12


def test_load_reports_http_errors_and_unreachable_server():
    from benchmarks.peers.http_load import stream_chat
    import asyncio
    import httpx

    async def one(url, content):
        async with httpx.AsyncClient() as c:
            return await stream_chat(c, url, [{"role": "user", "content": content}], max_tokens=2)

    with FakeServer() as srv:
        r = asyncio.run(one(srv.url, "please fail"))
    assert not r.ok and r.error.startswith("HTTP 500")
    r = asyncio.run(one(srv.url, "hello"))  # server stopped: connection refused, reported not raised
    assert not r.ok and "ConnectError" in r.error


def test_load_stops_starting_requests_after_time_budget():
    with FakeServer(delay_s=0.05) as srv:
        t0 = time.perf_counter()
        res = load(srv.url, concurrency=1, num_requests=1000, max_tokens=4, max_seconds=0.5)
    assert 1 <= res.requests < 20
    assert time.perf_counter() - t0 < 3


def test_load_rejects_bad_arguments():
    with pytest.raises(ValueError):
        load("http://127.0.0.1:9", concurrency=0, num_requests=1)
