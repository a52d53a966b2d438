"""POST /v1/completions: OpenAI's legacy text completions (one or many prompts, text or token ids)."""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from kvstrata.core import RequestOutput
from kvstrata.server.common import (
    SSE_DONE,
    SSE_HEADERS,
    build_sampling,
    completion_logprobs,
    gather_all,
    generate_final,
    new_id,
    now,
    open_stream,
    outputs,
    request_class,
    sse,
    sse_error,
    sum_usage,
    usage,
)
from kvstrata.server.errors import APIError
from kvstrata.server.protocol import CompletionRequest
from kvstrata.server.state import ServerState, get_state, owner

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])
MAX_PROMPTS = 64


def _prompts(st: ServerState, p: Any) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt: a string, a list of strings, a list of ids, or a list of id lists."""
    tok = st.tokenizer
    if isinstance(p, str):
        items: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [list(p)]
    else:
        items = list(p)
    if not items:
        raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
    vocab = st.engine.model_config.vocab_size
    out = []
    for x in items:
        if isinstance(x, str):
            tok.check_fits(x, st.engine.max_model_len)
            out.append((x, tok.encode(x)))
        else:
            bad = [t for t in x if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {vocab}); got {bad[:5]}", param="prompt")
            out.append((tok.decode(x, skip_special_tokens=False), [int(t) for t in x]))
        if not out[-1][1]:
            raise APIError(400, "a prompt has no tokens; give at least one", param="prompt")
    return out


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, _owner=Depends(owner)):
    st = get_state(request)
    st.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    if body.stream and len(body.prompt) > 1 and not isinstance(body.prompt, str) \
            and not all(isinstance(x, int) for x in body.prompt):
        raise APIError(400, "streaming takes one prompt per request", param="prompt")
    prompts = _prompts(st, body.prompt)
    clamp = "max_tokens" not in body.model_fields_set  # the default 16 shrinks to fit; a value sent must fit
    params = [build_sampling(st, body, len(ids), max_tokens=body.max_tokens, n=body.n, logprobs=body.logprobs,
                             clamp=clamp) for _, ids in prompts]
    rc = request_class(body)
    cid = new_id("cmpl-")
    if body.stream:
        text, ids = prompts[0]
        first, agen = await open_stream(st, request, ids, params[0], rc)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(st, body, cid, text, first, agen, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    outs = await gather_all([generate_final(st, request, ids, p, rc) for (_, ids), p in zip(prompts, params)])
    choices = []
    for k, ((text, _), out) in enumerate(zip(prompts, outs)):
        for o in out.outputs:
            prefix = text if body.echo else ""
            choices.append({
                "index": k * body.n + o.index,
                "text": prefix + o.text,
                "logprobs": completion_logprobs(st.tokenizer, o.logprobs, 0, len(prefix)) if body.logprobs is not None else None,
                "finish_reason": o.finish_reason.value if o.finish_reason else "stop",
            })
    return {"id": cid, "object": "text_completion", "created": now(), "model": body.model, "choices": choices,
            "usage": sum_usage([usage(o) for o in outs]), "system_fingerprint": None}


async def _stream(st: ServerState, body: CompletionRequest, cid: str, prompt_text: str, first: RequestOutput,
                  agen: AsyncIterator[RequestOutput], include_usage: bool) -> AsyncIterator[str]:
    created = now()
    n = body.n
    sent_text, sent_tok, done = [""] * n, [0] * n, [False] * n
    offsets = [len(prompt_text) if body.echo else 0] * n

    def chunk(choices: list[dict], **extra: Any) -> str:
        return sse({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                    "system_fingerprint": None, "choices": choices, **extra})

    if body.echo:
        for i in range(n):
            yield chunk([{"index": i, "text": prompt_text, "logprobs": None, "finish_reason": None}])
    last = first
    try:
        async for out in outputs(first, agen):
            last = out
            for o in out.outputs:
                i = o.index
                if done[i]:
                    continue
                delta = o.text[len(sent_text[i]):] if o.text.startswith(sent_text[i]) else ""
                if not (delta or o.finished):
                    continue
                lp = None
                if body.logprobs is not None:
                    lp = completion_logprobs(st.tokenizer, o.logprobs, sent_tok[i], offsets[i])
                offsets[i] += len(delta)
                sent_text[i] += delta
                sent_tok[i] = len(o.token_ids)
                done[i] = o.finished
                yield chunk([{"index": i, "text": delta, "logprobs": lp,
                              "finish_reason": o.finish_reason.value if o.finished else None}])
    except Exception as e:
        log.warning("completion stream %s failed: %s", cid, e)
        yield sse_error(e)
        yield SSE_DONE
        return
    if last.finished:
        st.metrics.observe_output(last)
    if include_usage:
        yield chunk([], usage=usage(last))
    yield SSE_DONE
