"""POST /v1/chat/completions: OpenAI's chat API, streaming (SSE) and not, with tools and JSON outputs.

With tools active (tools given, tool_choice not "none"), a streamed reply is held back until it is
complete and then sent as one content delta or one tool_calls delta: a tool call can only be told
from text once it is whole. Meanwhile (and in any stream with nothing to send for KEEPALIVE_S) an SSE
comment goes out every KEEPALIVE_S, so clients and proxies see a live connection.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from kvstrata.core import RequestOutput
from kvstrata.server import chat_format as cf
from kvstrata.server.common import (
    SSE_DONE,
    SSE_HEADERS,
    build_sampling,
    chat_logprobs,
    generate_final,
    keepalive_sse,
    new_id,
    now,
    open_stream,
    outputs,
    request_class,
    sse,
    sse_error,
    usage,
)
from kvstrata.server.errors import APIError
from kvstrata.server.protocol import ChatCompletionRequest
from kvstrata.server.state import ServerState, get_state, owner

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


class ChatPlan:
    """Everything decided before generation: prompt ids, sampling, tool handling."""

    def __init__(self, st: ServerState, body: ChatCompletionRequest) -> None:
        st.check_model(body.model)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        tools, choice = cf.check_tools(body.tools, body.tool_choice)
        msgs = cf.messages_to_dicts(body.messages)
        text = cf.render(st.tokenizer, msgs, tools, choice, context=st.engine.max_model_len)
        self.prompt = st.tokenizer.encode(text, add_special_tokens=False)
        forced = cf.forced_spec(tools, choice)
        structured = cf.structured_from_response_format(body.response_format)
        if forced and structured:
            raise APIError(400, "a forced tool call and response_format cannot be combined", param="response_format")
        self.parse_tools = cf.parses_tools(tools, choice)
        self.top = (body.top_logprobs or 0) if body.logprobs else 0
        self.params = build_sampling(
            st, body, len(self.prompt), max_tokens=body.max_completion_tokens or body.max_tokens, n=body.n,
            logprobs=self.top if body.logprobs else None, structured=forced or structured)
        self.rc = request_class(body)


def chat_choices(st: ServerState, out: RequestOutput, plan: ChatPlan) -> list[dict[str, Any]]:
    choices = []
    for o in out.outputs:
        msg, has_calls = cf.assistant_message(o.text, plan.parse_tools)
        choices.append({
            "index": o.index,
            "message": {**msg, "refusal": None},
            "logprobs": chat_logprobs(st.tokenizer, o.logprobs, top=plan.top) if plan.params.logprobs is not None else None,
            "finish_reason": cf.finish_reason(o, has_calls),
        })
    return choices


def _program(body: ChatCompletionRequest) -> str | None:
    """OpenAI's `prompt_cache_key` names requests that share a prefix: one agent's turns (else the
    X-Session-Id header, common.program_of)."""
    key = getattr(body, "prompt_cache_key", None)
    return key if isinstance(key, str) and key else None


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, _owner=Depends(owner)):
    st = get_state(request)
    plan = ChatPlan(st, body)
    cid = new_id("chatcmpl-")
    if body.stream:
        first, agen = await open_stream(st, request, plan.prompt, plan.params, plan.rc, program=_program(body))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(st, plan, cid, body.model, first, agen, include_usage)
        return StreamingResponse(keepalive_sse(events), media_type="text/event-stream", headers=SSE_HEADERS)
    out = await generate_final(st, request, plan.prompt, plan.params, plan.rc, program=_program(body))
    return {
        "id": cid, "object": "chat.completion", "created": now(), "model": body.model,
        "choices": chat_choices(st, out, plan), "usage": usage(out), "system_fingerprint": None,
    }


async def _stream(st: ServerState, plan: ChatPlan, cid: str, model: str, first: RequestOutput,
                  agen: AsyncIterator[RequestOutput], include_usage: bool) -> AsyncIterator[str]:
    created = now()
    n = plan.params.n
    sent_text = [""] * n
    sent_tokens = [0] * n
    done = [False] * n
    want_lp = plan.params.logprobs is not None

    def chunk(choices: list[dict], **extra: Any) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": None, "choices": choices, **extra})

    for i in range(n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    last = first
    try:
        async for out in outputs(first, agen):
            last = out
            for o in out.outputs:
                i = o.index
                if done[i]:
                    continue
                if plan.parse_tools:  # held back until whole (see the module docstring)
                    if o.finished:
                        done[i] = True
                        msg, has_calls = cf.assistant_message(o.text, True)
                        delta: dict[str, Any] = {}
                        if msg.get("content"):
                            delta["content"] = msg["content"]
                        if has_calls:
                            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
                        lp = chat_logprobs(st.tokenizer, o.logprobs, 0, plan.top) if want_lp else None
                        yield chunk([{"index": i, "delta": delta, "logprobs": lp,
                                      "finish_reason": cf.finish_reason(o, has_calls)}])
                    continue
                delta_text = o.text[len(sent_text[i]):] if o.text.startswith(sent_text[i]) else ""
                lp = chat_logprobs(st.tokenizer, o.logprobs, sent_tokens[i], plan.top) if want_lp else None
                if delta_text or (lp and lp["content"]) or o.finished:
                    sent_text[i] += delta_text
                    sent_tokens[i] = len(o.token_ids)
                    fr = cf.finish_reason(o, False) if o.finished else None
                    done[i] = o.finished
                    yield chunk([{"index": i, "delta": {"content": delta_text} if delta_text else {},
                                  "logprobs": lp, "finish_reason": fr}])
    except Exception as e:  # after the headers went out, an error travels as an event
        log.warning("chat stream %s failed: %s", cid, e)
        yield sse_error(e)
        yield SSE_DONE
        return
    if last.finished:
        st.metrics.observe_output(last)
    if include_usage:
        yield chunk([], usage=usage(last))
    yield SSE_DONE
