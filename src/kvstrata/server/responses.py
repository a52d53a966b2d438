"""POST /v1/responses and GET /v1/responses/{id}: OpenAI's Responses API, stateful through sessions.

Every stored response belongs to a durable session (the store's responses table maps its id to the
session and the turn). `previous_response_id` continues that session: the client sends only the new
input, and the session's stored tokens are the prompt's prefix (so `cached_tokens` covers the history).
Continuing from an older response than the session's latest, or changing `instructions` or `tools`,
branches into a new session holding the history up to that response.

`tools` not resent on a continuation stay those of the session. `store: false` runs the turn
without writing anything (the id it returns cannot be continued).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request

from kvstrata.core import RequestClass
from kvstrata.server import chat_format as cf
from kvstrata.server.common import build_sampling, new_id, now
from kvstrata.server.errors import APIError
from kvstrata.server.protocol import ResponsesRequest
from kvstrata.server.state import ServerState, get_state, owner
from kvstrata.server.turns import run_turn
from kvstrata.sessions import Session, SessionState

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text"):
                parts.append(str(p.get("text", "")))
            else:
                raise APIError(400, f"unsupported input content part {p!r}: text parts only", param="input")
        return "".join(parts)
    raise APIError(400, "message content must be a string or a list of text parts", param="input")


def input_to_messages(inp: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses `input` items to chat messages (function calls and their outputs included)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    msgs: list[dict[str, Any]] = []
    for item in inp:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"input message role must be user, assistant, system or developer, got {role!r}",
                               param="input")
            msgs.append({"role": "system" if role == "developer" else role, "content": _text(item.get("content"))})
        elif kind == "function_call":
            if not item.get("call_id") or not item.get("name"):
                raise APIError(400, "a function_call item needs call_id and name", param="input")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not item.get("call_id"):
                raise APIError(400, "a function_call_output item needs the call_id it answers", param="input")
            out = item.get("output", "")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": out if isinstance(out, str) else json.dumps(out)})
        else:
            raise APIError(400, f"unsupported input item type {kind!r}", param="input")
    if not msgs:
        raise APIError(400, "input is empty", param="input")
    return msgs


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Responses tools ({"type": "function", "name", ...}) to chat tools ({"type", "function": {...}})."""
    if not tools:
        return None
    out = []
    for t in tools:
        if t.get("type") != "function":
            raise APIError(400, f"unsupported tool type {t.get('type')!r}: only function tools", param="tools")
        if "function" in t:
            out.append(t)
            continue
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(tc: Any) -> Any:
    if isinstance(tc, dict) and tc.get("type") == "function" and "name" in tc:
        return {"type": "function", "function": {"name": tc["name"]}}
    return tc


def output_items(msg: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if msg.get("content"):
        items.append({"type": "message", "id": new_id("msg_"), "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": msg["content"], "annotations": [], "logprobs": []}]})
    for c in msg.get("tool_calls") or ():
        items.append({"type": "function_call", "id": new_id("fc_"), "call_id": c["id"],
                      "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"})
    if not items:
        items.append({"type": "message", "id": new_id("msg_"), "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]})
    return items


async def _new_session(st: ServerState, persist: bool, who: Any, **kw: Any) -> Session:
    if persist:
        return await st.db(st.store.create_session, owner=who, **kw)
    t = now()  # store: false -> an in-memory session that is never written
    return Session(id="ephemeral", owner=who, state=SessionState.ACTIVE, request_class=kw["request_class"],
                   version=1, created_at=t, updated_at=t, system_prompt=kw.get("system_prompt"),
                   tools=kw.get("tools"), messages=list(kw.get("messages", [])),
                   token_ids=list(kw.get("token_ids", [])), metadata=kw.get("metadata") or {})


async def _session_for(st: ServerState, body: ResponsesRequest, who: Any, tools: list | None
                       ) -> tuple[Session, int, str | None]:
    """(session to continue, turn number, branched-from id) for this request; a branch when the history
    diverges from the session's latest turn."""
    rc = RequestClass(body.request_class or "interactive")
    if not body.previous_response_id:
        s = await _new_session(st, body.store, who, system_prompt=body.instructions, tools=tools,
                               request_class=rc, metadata={"api": "responses"})
        return s, 0, None
    rec = await st.db(st.store.get_response, body.previous_response_id, owner=who)
    s = await st.db(st.store.get_session, rec.session_id, owner=who)
    at = rec.output.get("num_messages", s.num_messages)
    at_tokens = rec.output.get("num_tokens", s.num_tokens)
    new_sys = body.instructions if body.instructions is not None else s.system_prompt
    new_tools = tools if tools is not None else s.tools
    if s.num_messages == at and new_sys == s.system_prompt and new_tools == s.tools:
        if not body.store:
            s.id = "ephemeral"
        return s, rec.turn + 1, None
    same_render = new_sys == s.system_prompt and new_tools == s.tools
    b = await _new_session(st, body.store, who, messages=s.messages[:at],
                           token_ids=s.token_ids[:at_tokens] if same_render else [], system_prompt=new_sys,
                           tools=new_tools, request_class=s.request_class,
                           metadata={"api": "responses", "branched_from": s.id})
    return b, rec.turn + 1, s.id


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, who=Depends(owner)):
    st = get_state(request)
    st.check_model(body.model)
    if body.stream:
        raise APIError(400, "stream is not supported on /v1/responses; use /v1/chat/completions to stream",
                       param="stream")
    tools = chat_tools(body.tools)
    choice = chat_tool_choice(body.tool_choice)
    cf.check_tools(tools, choice)
    new_msgs = input_to_messages(body.input)
    fmt = (body.text or {}).get("format") if isinstance(body.text, dict) else None
    structured = cf.structured_from_response_format(fmt, "text.format")

    def make_params(prompt_len: int, forced: dict | None):
        if forced and structured:
            raise APIError(400, "a forced tool call and text.format cannot be combined", param="text")
        return build_sampling(st, body, prompt_len, max_tokens=body.max_output_tokens, structured=forced or structured)

    sess, turn_no, branched_from = await _session_for(st, body, who, tools)
    async with st.session_lock(sess.id):
        if body.store:  # re-read under the lock: another turn may have landed meanwhile
            fresh = await st.db(st.store.get_session, sess.id, owner=who)
            if fresh.num_messages != sess.num_messages:
                raise APIError(409, f"response {body.previous_response_id!r} was continued concurrently; retry",
                               code="version_conflict")
            sess = fresh
        turn = await run_turn(st, request, sess, who, new_msgs, make_params, tool_choice=choice, persist=body.store)
    o = turn.out.outputs[0]
    incomplete = o.finish_reason is not None and o.finish_reason.value == "length"
    u = turn.usage
    resp: dict[str, Any] = {
        "id": None, "object": "response", "created_at": now(), "status": "incomplete" if incomplete else "completed",
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
        "output": output_items(turn.message), "parallel_tool_calls": True,
        "previous_response_id": body.previous_response_id,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0, "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [], "text": body.text or {"format": {"type": "text"}}, "truncation": "disabled",
        "usage": {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                  "total_tokens": u["total_tokens"],
                  "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                                           "cached_tokens_by_tier": u["prompt_tokens_details"]["cached_tokens_by_tier"]},
                  "output_tokens_details": {"reasoning_tokens": 0}},
        "metadata": body.metadata or {}, "store": body.store, "user": body.user,
        "session_id": sess.id if body.store else None, "branched_from": branched_from,
    }
    if body.store and turn.info is not None:
        rec = await st.db(st.store.put_response, sess.id, owner=who, turn=turn_no,
                          output={"response": resp, "num_messages": turn.info.num_messages,
                                  "num_tokens": turn.info.num_tokens},
                          usage=resp["usage"])
        resp["id"] = rec.id
    else:
        resp["id"] = new_id("resp_")
    return resp


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request, who=Depends(owner)):
    st = get_state(request)
    rec = await st.db(st.store.get_response, response_id, owner=who)
    resp = dict(rec.output.get("response", {})) if isinstance(rec.output, dict) else {}
    resp["id"] = rec.id
    return resp
