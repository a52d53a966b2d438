"""Helpers shared by the generating routes: SamplingParams from a request, usage, logprobs, SSE, ids."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import Request

from kvstrata.core import KvstrataError, RequestClass, RequestOutput, SamplingParams, TokenLogprob
from kvstrata.server.errors import APIError, error_body, to_api_error
from kvstrata.server.protocol import SamplingFields
from kvstrata.server.state import ServerState, until_disconnect

OPENAI_DEFAULT_TEMPERATURE = 1.0  # a request that sets top_p / top_k / min_p but no temperature
MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy decoding (vLLM's _SAMPLING_EPS)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18)


def now() -> int:
    return int(time.time())


def default_max_tokens(st: ServerState, prompt_len: int) -> int:
    """What fits after the prompt: the context window, and the device pool (a request must fit there)."""
    e = st.engine
    cap = min(e.max_model_len, e.pool.num_blocks * e.pool.block_size)
    return max(1, cap - prompt_len)


def build_sampling(
    st: ServerState,
    req: SamplingFields,
    prompt_len: int,
    *,
    max_tokens: int | None,
    n: int = 1,
    logprobs: int | None = None,
    structured: dict | None = None,
    max_tokens_param: str = "max_tokens",
    clamp: bool = False,
) -> SamplingParams:
    """The request's SamplingParams. A `max_tokens` (named `max_tokens_param` in the request) that does
    not fit in the context after the prompt is a 400 `context_length_exceeded`, as OpenAI answers; with
    `clamp` (Anthropic clients send their model's largest output whatever the context; a default value)
    it is lowered to what fits instead. None: what fits (default_max_tokens)."""
    if max_tokens is not None:
        room = st.engine.max_model_len - prompt_len
        if max_tokens > room >= 1:  # (room < 1: the prompt alone is too long, which the engine reports)
            if not clamp:
                raise APIError(
                    400, f"{max_tokens_param} is {max_tokens}, but the prompt's {prompt_len} tokens leave room for "
                    f"{room} in the model's {st.engine.max_model_len}-token context; lower {max_tokens_param} "
                    "or shorten the prompt", code="context_length_exceeded", param=max_tokens_param)
            max_tokens = room
    stop = req.stop
    if isinstance(stop, str):
        stop = [stop]
    if stop and len(stop) > 16:
        raise APIError(400, f"at most 16 stop strings, got {len(stop)}", param="stop")
    d = {}  # a request that sets no sampling field gets the server's (the model's recommended, loader/sampling.py)
    if all(getattr(req, f) is None for f in ("temperature", "top_p", "top_k", "min_p")):
        d = st.sampling_defaults
    temperature = d.get("temperature", OPENAI_DEFAULT_TEMPERATURE) if req.temperature is None else req.temperature
    if 0.0 < temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow to inf: treat as greedy (as vLLM)
        temperature = 0.0
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens(st, prompt_len),
            temperature=temperature,
            top_p=d.get("top_p", 1.0) if req.top_p is None else req.top_p,
            top_k=int(d.get("top_k", 0)) if req.top_k is None else req.top_k,
            min_p=d.get("min_p", 0.0) if req.min_p is None else req.min_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=tuple(stop or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            n=n,
            structured=structured,
        )
    except KvstrataError as e:
        raise APIError(400, str(e), code="invalid_request") from None


def request_class(req: SamplingFields, default: str = "interactive") -> RequestClass:
    return RequestClass(req.request_class or default)


def usage(out: RequestOutput, prompt_len: int | None = None) -> dict[str, Any]:
    """OpenAI chat/completions usage; cached_tokens = prompt tokens loaded from any tier, not computed."""
    p = len(out.prompt_token_ids) if prompt_len is None else prompt_len
    c = sum(len(o.token_ids) for o in out.outputs)
    m = out.metrics
    by_tier = dict(m.cached_prompt_tokens_by_tier or {})
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": m.cached_prompt_tokens, "cached_tokens_by_tier": by_tier},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def sum_usage(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                             "prompt_tokens_details": {"cached_tokens": 0, "cached_tokens_by_tier": {}}}
    for u in parts:
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            total[k] += u[k]
        d = total["prompt_tokens_details"]
        d["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
        for t, n in u["prompt_tokens_details"]["cached_tokens_by_tier"].items():
            d["cached_tokens_by_tier"][t] = d["cached_tokens_by_tier"].get(t, 0) + n
    return total


# ---------------------------------------------------------------------------------------------- logprobs


def _tok_str(tok, i: int) -> str:
    return tok.decode([i], skip_special_tokens=False)


def chat_logprobs(tok, lps: list[TokenLogprob] | None, start: int = 0, top: int = 0) -> dict[str, Any] | None:
    """OpenAI chat format: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    if lps is None:
        return None
    content = []
    for lp in lps[start:]:
        s = _tok_str(tok, lp.token_id)
        content.append({
            "token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
            "top_logprobs": [{"token": (t := _tok_str(tok, i)), "logprob": v, "bytes": list(t.encode())}
                             for i, v in lp.top[:top]],
        })
    return {"content": content, "refusal": None}


def completion_logprobs(tok, lps: list[TokenLogprob] | None, start: int, offset0: int) -> dict[str, Any] | None:
    """OpenAI legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    off = offset0
    for lp in lps[start:]:
        s = _tok_str(tok, lp.token_id)
        tokens.append(s)
        token_lps.append(lp.logprob)
        tops.append({_tok_str(tok, i): v for i, v in lp.top})
        offsets.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------------------------------------- running


def program_of(request: Request, known: str | None = None) -> str | None:
    """The agent program a request belongs to, which orders the engine's waiting work (least attained
    service first, sched/scheduler.py): the session it continues when the route knows one, else the
    client's `X-Session-Id` header (what agent harnesses and the cluster router send), else none."""
    header = request.headers.get("x-session-id")
    return known or (header if header and header != "new" else None)


async def _admitted(st: ServerState, request: Request, prompt: list[int], params: SamplingParams, rc: RequestClass,
                    program: str | None = None, session: bool = False) -> AsyncIterator[RequestOutput]:
    """The engine stream of this request, through the server's admission gate as the caller's key. A
    stream closed before its request finished (the client left: the request is aborted) has its tokens
    counted here; the routes count finished ones (Metrics.observe_output). A request of an agent program
    that is not a stored `session` (whose route pauses it) resumes the program's paused KV before it is
    admitted and pauses it when it finishes (SessionKV.resume_program / pause_program_later)."""
    pid = program_of(request, program)
    stateless = pid is not None and not session
    if stateless:
        await st.skv.resume_program(pid, prompt)
    agen = st.admission.generate(prompt, params, request_class=rc, owner=getattr(request.state, "owner", None),
                                 program=pid)
    last: RequestOutput | None = None
    try:
        async for out in agen:
            last = out
            yield out
    finally:
        await agen.aclose()
        if last is not None and not last.finished:
            st.metrics.observe_aborted(last)
        elif last is not None and stateless:
            st.skv.pause_program_later(pid, prompt + list(last.outputs[0].token_ids))


async def generate_final(st: ServerState, request: Request, prompt: list[int], params: SamplingParams,
                         rc: RequestClass, program: str | None = None, session: bool = False) -> RequestOutput:
    """Run one engine request to the end (aborted if the client disconnects); records metrics."""
    st.check_accepting()

    async def consume() -> RequestOutput:
        last = None
        async with aclosing(_admitted(st, request, prompt, params, rc, program, session)) as outs:  # closed (aborted) when cancelled
            async for out in outs:
                last = out
        assert last is not None and last.finished
        return last

    out = await until_disconnect(request, consume())
    st.metrics.observe_output(out)
    return out


async def open_stream(st: ServerState, request: Request, prompt: list[int], params: SamplingParams,
                      rc: RequestClass, program: str | None = None,
                      session: bool = False) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
    """Start an engine request and wait for its first output, so that errors (429, too long, a bad
    schema) still become HTTP error statuses before the SSE stream begins."""
    st.check_accepting()
    agen = _admitted(st, request, prompt, params, rc, program, session)
    try:
        first = await until_disconnect(request, agen.__anext__())
    except BaseException:
        await agen.aclose()
        raise
    return first, agen


async def gather_all(aws: list) -> list:
    """asyncio.gather that cancels (so aborts) the other requests when one fails."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies and timeouts see bytes
KEEPALIVE_S = 5.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_error(e: BaseException) -> str:
    """An error after the stream started: OpenAI sends the error object as a data event."""
    a = to_api_error(e)
    return sse(error_body(a.status, a.message, a.code, a.param))


async def outputs(first: RequestOutput, agen: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """The first output, then the rest; closes the engine stream (aborting it) if the consumer stops."""
    try:
        yield first
        if not first.finished:
            async for out in agen:
                yield out
    finally:
        await agen.aclose()  # type: ignore[attr-defined]


async def with_keepalive(items: AsyncIterator[Any], every_s: float | None = None) -> AsyncIterator[Any]:
    """The items of `items`, and None whenever `every_s` (default KEEPALIVE_S) pass without one (a stream
    that holds its reply back sends an SSE comment then). Closing this closes `items`."""
    every_s = every_s or KEEPALIVE_S
    it = items.__aiter__()
    nxt: asyncio.Future | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=every_s)
            if not done:
                yield None
                continue
            fut, nxt = nxt, None
            try:
                item = fut.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if nxt is not None:
            nxt.cancel()
            await asyncio.gather(nxt, return_exceptions=True)
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


async def keepalive_sse(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE events of `events`, plus an SSE comment whenever KEEPALIVE_S pass without one (a stream
    holding its reply back, a request waiting for the engine)."""
    async for ev in with_keepalive(events):
        yield SSE_KEEPALIVE if ev is None else ev
