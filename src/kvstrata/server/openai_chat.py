"""POST /v1/chat/completions: OpenAI's chat API, streaming (SSE) and not, with tools and JSON outputs.

With tools active (tools given, tool_choice not "none"), a streamed reply is parsed as it is
generated (tokenizer/tool_stream.py): text goes out as content deltas, and from the tool-call opening
tag on, each call as a tool_calls delta with its id and name, then its arguments in fragments. The
content and calls they add up to are those of the same reply non-streamed. `parallel_tool_calls`
(default true) allows up to MAX_PARALLEL_CALLS calls in a reply, also under tool_choice "required";
false allows one (chat_format.call_limit). In any stream with nothing
to send for KEEPALIVE_S an SSE comment goes out, so clients and proxies see a live connection.
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
from kvstrata.tokenizer.tool_stream import ArgsDelta, CallStart, Event, TextDelta, ToolCallStream

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
        self.max_calls = cf.call_limit(body.parallel_tool_calls, choice)
        forced = cf.forced_spec(tools, choice, self.max_calls)
        structured = cf.structured_from_response_format(body.response_format)
        if forced and structured:
            raise APIError(400, "a forced tool call and response_format cannot be combined", param="response_format")
        self.parse_tools = cf.parses_tools(tools, choice)
        self.top = (body.top_logprobs or 0) if body.logprobs else 0
        params = build_sampling(
            st, body, len(self.prompt), max_tokens=body.max_completion_tokens or body.max_tokens, n=body.n,
            logprobs=self.top if body.logprobs else None, structured=forced or structured,
            max_tokens_param="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        self.params = cf.stop_after_call(params, forced, self.parse_tools, self.max_calls)
        self.rc = request_class(body)


def chat_choices(st: ServerState, out: RequestOutput, plan: ChatPlan) -> list[dict[str, Any]]:
    choices = []
    for o in out.outputs:
        msg, has_calls = cf.assistant_message(o.text, plan.parse_tools, plan.max_calls)
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
    parsers = [ToolCallStream(plan.max_calls) for _ in range(n)] if plan.parse_tools else None

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
                if parsers is not None:
                    evs = parsers[i].feed(o.text)
                    calls_seen = False
                    if o.finished:
                        last_evs, _content, calls = parsers[i].finish()
                        evs += last_evs
                        calls_seen = bool(calls)
                    deltas = tool_deltas(evs)
                    if o.finished:
                        done[i] = True
                        deltas = deltas or [{}]
                    if not deltas:
                        continue  # logprobs of these tokens go with the next delta
                    lp = chat_logprobs(st.tokenizer, o.logprobs, sent_tokens[i], plan.top) if want_lp else None
                    sent_tokens[i] = len(o.token_ids)
                    for k, d in enumerate(deltas):
                        end = o.finished and k == len(deltas) - 1
                        yield chunk([{"index": i, "delta": d, "logprobs": lp if k == 0 else None,
                                      "finish_reason": cf.finish_reason(o, calls_seen) if end else None}])
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


def tool_deltas(evs: list[Event]) -> list[dict[str, Any]]:
    """Chat chunk deltas for stream events: runs of text merged into one content delta, a call's start
    as {"tool_calls": [{index, id, type, function: {name, arguments: ""}}]}, its argument fragments
    merged likewise."""
    out: list[dict[str, Any]] = []
    for e in evs:
        prev = out[-1] if out else None
        if isinstance(e, TextDelta):
            if prev is not None and "content" in prev:
                prev["content"] += e.text
            else:
                out.append({"content": e.text})
        elif isinstance(e, CallStart):
            out.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                        "function": {"name": e.name, "arguments": ""}}]})
        elif isinstance(e, ArgsDelta):
            tc = prev["tool_calls"][0] if prev is not None and "tool_calls" in prev else None
            if tc is not None and tc["index"] == e.index and "id" not in tc:
                tc["function"]["arguments"] += e.text
            else:
                out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return out
