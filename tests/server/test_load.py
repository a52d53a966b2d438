"""Serving under load: many concurrent streaming clients, and a client that disconnects mid-stream."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai


def test_32_concurrent_streaming_clients_all_complete(tiny_server):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str, int]:
        stream = await c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"client {i}: the quick brown fox"}],
            max_tokens=24, temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage.completion_tokens
        return text, finish, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    for text, finish, ntok in results:
        assert finish in ("stop", "length") and ntok is not None and 1 <= ntok <= 24
    assert tiny_server.engine_call(lambda e: e.pool.summary()["in_use"]) == 0


def test_disconnected_stream_frees_its_blocks(tiny_server, slow_steps):
    in_use = lambda: tiny_server.engine_call(lambda e: e.pool.summary()["in_use"])  # noqa: E731
    assert in_use() == 0
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell a long story " * 20}],
            "max_tokens": 600, "stream": True, "ignore_eos": True}
    gen0 = tiny_server.engine_call(lambda e: e.counters["generated_tokens"])
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", tiny_server.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert in_use() > 0  # the request holds blocks while it streams
    # the connection is closed mid-stream: the server aborts the request and frees its blocks
    deadline = time.time() + 20
    while in_use() != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert in_use() == 0
    assert tiny_server.state.aengine.num_active == 0
    assert tiny_server.engine_call(lambda e: len(e.requests)) == 0
    assert tiny_server.engine_call(lambda e: e.counters["generated_tokens"]) - gen0 < 600  # aborted, not finished


def test_disconnect_before_first_token_aborts(tiny_server, slow_steps):
    """A non-streaming request whose client gives up is aborted too (the handler watches the socket)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000, "ignore_eos": True}
    gen0 = tiny_server.engine_call(lambda e: e.counters["generated_tokens"])
    try:
        httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=0.5)
    except httpx.TimeoutException:
        pass
    deadline = time.time() + 20
    while tiny_server.engine_call(lambda e: len(e.requests)) and time.time() < deadline:
        time.sleep(0.05)
    assert tiny_server.engine_call(lambda e: (len(e.requests), e.pool.summary()["in_use"])) == (0, 0)
    assert tiny_server.engine_call(lambda e: e.counters["generated_tokens"]) - gen0 < 1000  # stopped early
