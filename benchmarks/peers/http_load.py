"""A peer-neutral load generator for OpenAI-compatible chat endpoints (streaming SSE).

N workers each send chat completions one after another (stream=True, fixed max_tokens) until the
request budget or the time budget is spent. Measured per request: time to first token (TTFT, from
sending to the first content chunk), the gaps between content chunks (inter-token latency, ITL) and
the completion tokens (from the final ``usage`` chunk when the server sends one, else one per content
chunk). Aggregate tokens/s is completion tokens of all requests / wall time of the whole run.

Works against any server: llama-server, vLLM, kvstrata. `ignore_eos` is a llama.cpp / vLLM extension
that makes every request generate exactly max_tokens; servers that do not know it ignore the field,
which is why tokens are counted, never assumed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field

import httpx

logger = logging.getLogger(__name__)

# A fixed vocabulary of plain words: prompts are reproducible, and distinct per request (so no two
# requests share more than the chat template's prefix).
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three"
).split()


def synthetic_prompt(index: int, n_words: int, seed: int = 0) -> str:
    """A reproducible prompt of `n_words` words (about 1.3 tokens per word for Llama-style BPE)."""
    rng = random.Random(seed * 1_000_003 + index)
    body = " ".join(rng.choice(_WORDS) for _ in range(n_words))
    return f"Request {index}. Continue this text: {body}"


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens the server reused (if it says)
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    error: str = ""


async def sse_events(r: httpx.Response):
    """The JSON messages of an OpenAI-style server-sent event stream, up to `data: [DONE]`."""
    async for line in r.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], *, max_tokens: int,
                      model: str = "default", ignore_eos: bool = True, temperature: float = 0.0,
                      extra: dict | None = None, timeout: float = 600.0) -> RequestResult:
    """One streaming chat completion; returns its timings. Errors are reported, not raised."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "temperature": temperature, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    t0 = time.perf_counter()
    last = None
    res = RequestResult(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for msg in sse_events(r):
                now = time.perf_counter()
                choices = msg.get("choices") or []
                delta = choices[0].get("delta", {}) if choices else {}
                if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                    chunks += 1
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last)
                    last = now
                usage = msg.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.completion_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    if "cached_tokens" in details:
                        res.cached_tokens = details["cached_tokens"]
                timings = msg.get("timings")  # llama-server extension
                if timings and "cache_n" in timings:
                    res.cached_tokens = timings["cache_n"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency_s = time.perf_counter() - t0
    if not res.completion_tokens:
        res.completion_tokens = chunks
    res.ok = res.completion_tokens > 0
    if not res.ok:
        res.error = "no tokens streamed"
    return res


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict:
    """Nearest-rank percentiles in milliseconds; empty input gives None values."""
    if not values:
        return {f"p{p}": None for p in ps}
    s = sorted(values)
    out = {}
    for p in ps:
        k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
        out[f"p{p}"] = round(s[k] * 1000, 2)
    return out


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    ok: int
    errors: list[str]
    wall_s: float
    completion_tokens: int
    prompt_tokens: int
    tokens_per_s: float
    ttft_ms: dict
    itl_ms: dict
    tpot_ms_mean: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(results: list[RequestResult], concurrency: int, wall_s: float) -> LoadResult:
    good = [r for r in results if r.ok]
    comp = sum(r.completion_tokens for r in good)
    tpots = [(r.latency_s - r.ttft_s) / (r.completion_tokens - 1) for r in good
             if r.ttft_s is not None and r.completion_tokens > 1]
    return LoadResult(
        concurrency=concurrency, requests=len(results), ok=len(good),
        errors=[r.error for r in results if not r.ok][:5], wall_s=round(wall_s, 3),
        completion_tokens=comp, prompt_tokens=sum(r.prompt_tokens for r in good),
        tokens_per_s=round(comp / wall_s, 2) if wall_s > 0 else 0.0,
        ttft_ms=percentiles([r.ttft_s for r in good if r.ttft_s is not None]),
        itl_ms=percentiles([x for r in good for x in r.itl_s]),
        tpot_ms_mean=round(1000 * sum(tpots) / len(tpots), 2) if tpots else None,
    )


async def run_load(url: str, *, concurrency: int, num_requests: int, max_tokens: int = 64,
                   prompt_words: int = 100, max_seconds: float = 300.0, model: str = "default",
                   ignore_eos: bool = True, seed: int = 0) -> LoadResult:
    """`concurrency` closed-loop workers share `num_requests` requests; no new request starts after
    `max_seconds` (requests in flight finish)."""
    if concurrency < 1 or num_requests < 1:
        raise ValueError("concurrency and num_requests must be >= 1")
    counter = iter(range(num_requests))
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=None) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() - t0 > max_seconds:
                    return
                msgs = [{"role": "user", "content": synthetic_prompt(i, prompt_words, seed)}]
                results.append(await stream_chat(client, url, msgs, max_tokens=max_tokens, model=model,
                                                 ignore_eos=ignore_eos))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    out = summarize(results, concurrency, wall)
    logger.info("c=%d: %d/%d ok, %.1f tok/s, TTFT p50 %s ms", concurrency, out.ok, out.requests,
                out.tokens_per_s, out.ttft_ms["p50"])
    return out


def load(url: str, **kw) -> LoadResult:
    """Synchronous wrapper of `run_load`."""
    return asyncio.run(run_load(url, **kw))
