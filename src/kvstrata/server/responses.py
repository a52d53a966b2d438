"""POST /v1/responses and GET /v1/responses/{id}: OpenAI's Responses API, stateful through sessions.

Every stored response belongs to a durable session (the store's responses table maps its id to the
session and the turn). `previous_response_id` continues that session: the client sends only the new
input, and the session's stored tokens are the prompt's prefix (so `cached_tokens` covers the history).
Continuing from an older response than the session's latest, or changing `instructions` or `tools`,
branches into a new session holding the history up to that response.

`tools` not resent on a continuation stay those of the session. `store: false` runs the turn
without writing anything (the id it returns cannot be continued).

`conversation` (an id from /v1/conversations, which is a session) continues that conversation at its
latest turn and adds the input and output to it. `context_management: [{"type": "compaction",
"compact_threshold": N}]` compacts the session first (memory/compaction.py) when the turn's prompt would
pass N tokens. A `{"type": "memory_search"}` tool is run by the server itself (not streamed).

`stream: true` sends the Responses event stream (responses_stream.py): text and function-call
arguments as they are generated. The turn is stored when the generation ends, under the id that
response.created announced; a client that disconnects first aborts it and nothing is stored.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from kvstrata.core import RequestClass
from kvstrata.server import chat_format as cf
from kvstrata.server.common import SSE_HEADERS, build_sampling, keepalive_sse, new_id, now, open_stream
from kvstrata.server.errors import APIError
from kvstrata.server.protocol import ResponsesRequest
from kvstrata.server.state import ServerState, get_state, owner
from kvstrata.server.turns import TurnResult, plan_turn, run_turn_with_builtins
from kvstrata.memory.tools import expand_tools
from kvstrata.sessions import Session, SessionNotFound, SessionState
from kvstrata.sessions.types import new_response_id

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


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(text: str, msg_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": msg_id or new_id("msg_"), "status": "completed", "role": "assistant",
            "content": [_text_part(text)]}


def output_items(msg: dict[str, Any], msg_id: str | None = None) -> list[dict[str, Any]]:
    """The assistant message as Responses output items; `msg_id` names its message item (a stream
    announced it before the text was whole)."""
    items: list[dict[str, Any]] = []
    if msg.get("content"):
        items.append(_message_item(msg["content"], msg_id))
    for c in msg.get("tool_calls") or ():
        items.append({"type": "function_call", "id": new_id("fc_"), "call_id": c["id"],
                      "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"})
    if not items:
        items.append(_message_item("", msg_id))
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
    if body.conversation is not None:
        if body.previous_response_id:
            raise APIError(400, "previous_response_id cannot be combined with conversation", param="conversation")
        cid = body.conversation.get("id") if isinstance(body.conversation, dict) else body.conversation
        if not isinstance(cid, str) or not cid:
            raise APIError(400, "conversation must be an id or {\"id\": ...}", param="conversation")
        try:
            s = await st.db(st.store.get_session, cid, owner=who)
        except SessionNotFound:
            raise APIError(404, f"conversation {cid!r} not found", code="conversation_not_found",
                           param="conversation") from None
        if tools is not None and tools != s.tools and s.num_messages:
            raise APIError(400, "a conversation keeps the tools of its first turn; send the same tools or none",
                           param="tools")
        if body.instructions is not None and body.instructions != s.system_prompt and s.num_messages:
            raise APIError(400, "a conversation keeps its instructions; send the same or none", param="instructions")
        return s, sum(m.get("role") == "assistant" for m in s.messages), None
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


def _response(body: ResponsesRequest, rid: str, *, status: str, output: list[dict[str, Any]], turn: TurnResult | None,
              session_id: str | None, branched_from: str | None) -> dict[str, Any]:
    """The response object, as returned, stored and carried by the stream's lifecycle events."""
    u = turn.usage if turn is not None else None
    return {
        "id": rid, "object": "response", "created_at": now(), "status": status,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
        "output": output,
        "parallel_tool_calls": cf.call_limit(body.parallel_tool_calls, chat_tool_choice(body.tool_choice)) > 1,
        "previous_response_id": body.previous_response_id,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0, "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [], "text": body.text or {"format": {"type": "text"}}, "truncation": "disabled",
        "usage": None if u is None else {
            "input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"], "total_tokens": u["total_tokens"],
            "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                                     "cached_tokens_by_tier": u["prompt_tokens_details"]["cached_tokens_by_tier"]},
            "output_tokens_details": {"reasoning_tokens": 0}},
        "metadata": body.metadata or {}, "store": body.store, "user": body.user,
        "session_id": session_id if body.store else None, "branched_from": branched_from,
        "conversation": {"id": session_id} if body.conversation is not None else None,
    }


def _status(turn: TurnResult) -> str:
    fr = turn.out.outputs[0].finish_reason
    return "incomplete" if fr is not None and fr.value == "length" else "completed"


def _response_id(body: ResponsesRequest) -> str:
    """Chosen before generating (a stream announces it first): the store's kind of id, or a plain one
    for `store: false`, which is never written."""
    return new_response_id() if body.store else new_id("resp_")


async def _store(st: ServerState, body: ResponsesRequest, who: Any, sess: Session, turn_no: int, turn: TurnResult,
                 resp: dict[str, Any], input_from: int) -> None:
    """Records the response, under its id, as the session's turn (nothing for `store: false`), with where
    its input items lie in the session's log (input_items)."""
    if body.store and turn.info is not None:
        await st.db(st.store.put_response, sess.id, owner=who, turn=turn_no,
                    output={"response": resp, "num_messages": turn.info.num_messages, "num_tokens": turn.info.num_tokens,
                            "input_from": input_from, "input_to": input_from + len(_input_of(body))},
                    usage=resp["usage"], response_id=resp["id"])


def _input_of(body: ResponsesRequest) -> list[dict[str, Any]]:
    return input_to_messages(body.input)


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, who=Depends(owner)):
    st = get_state(request)
    st.check_model(body.model)
    st.limits.check_metadata(body.metadata)
    tools = chat_tools(expand_tools(body.tools))
    choice = chat_tool_choice(body.tool_choice)
    cf.check_tools(tools, choice)
    new_msgs = input_to_messages(body.input)
    fmt = (body.text or {}).get("format") if isinstance(body.text, dict) else None
    structured = cf.structured_from_response_format(fmt, "text.format")

    def make_params(prompt_len: int, forced: dict | None):
        if forced and structured:
            raise APIError(400, "a forced tool call and text.format cannot be combined", param="text")
        return build_sampling(st, body, prompt_len, max_tokens=body.max_output_tokens, structured=forced or structured,
                              max_tokens_param="max_output_tokens")

    sess, turn_no, branched_from = await _session_for(st, body, who, tools)
    async with st.session_lock(sess.id):
        persist = body.store or body.conversation is not None  # a conversation's turns are always kept
        if persist:  # re-read under the lock: another turn may have landed meanwhile
            fresh = await st.db(st.store.get_session, sess.id, owner=who)
            if fresh.num_messages != sess.num_messages:
                raise APIError(409, f"response {body.previous_response_id!r} was continued concurrently; retry",
                               code="version_conflict")
            sess = fresh
            await st.skv.resume(sess, who)  # paused on its function calls: the KV comes back first
            await _context_management(st, body, sess, who, new_msgs, make_params, choice)
        input_from = sess.num_messages
        if body.stream:  # started under the lock, so errors (429, too long) are still HTTP statuses
            plan = plan_turn(st, sess, new_msgs, make_params, tool_choice=choice,
                             parallel_tool_calls=body.parallel_tool_calls)
            first, agen = await open_stream(st, request, plan.prompt, plan.params, plan.request_class, program=sess.id,
                                            session=True)
        else:
            turn = await run_turn_with_builtins(st, request, sess, who, new_msgs, make_params, tool_choice=choice,
                                                parallel_tool_calls=body.parallel_tool_calls, persist=persist)
    if body.stream:
        from kvstrata.server.responses_stream import events as stream_events  # it imports this module

        events = stream_events(st, body, who, sess, turn_no, branched_from, new_msgs, plan, first, agen, input_from)
        return StreamingResponse(keepalive_sse(events), media_type="text/event-stream", headers=SSE_HEADERS)
    resp = _response(body, _response_id(body), status=_status(turn), output=output_items(turn.message), turn=turn,
                     session_id=sess.id, branched_from=branched_from)
    await _store(st, body, who, sess, turn_no, turn, resp, input_from)
    return resp


async def _context_management(st: ServerState, body: ResponsesRequest, sess: Session, who: Any,
                              new_msgs: list[dict[str, Any]], make_params, choice: Any) -> None:
    """`context_management` compaction: compact first when this turn's prompt would pass the threshold."""
    entries = [c for c in body.context_management or () if isinstance(c, dict) and c.get("type") == "compaction"]
    if not entries:
        return
    threshold = entries[0].get("compact_threshold")
    if threshold is None:
        threshold = int(0.8 * st.engine.max_model_len)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise APIError(400, "context_management compact_threshold must be a positive number of tokens",
                       param="context_management")
    if not sess.messages:
        return
    plan = plan_turn(st, sess, new_msgs, make_params, tool_choice=choice)
    if len(plan.prompt) + (body.max_output_tokens or 0) <= threshold:
        return
    from kvstrata.server.memory_api import compact_session, policy_for

    await compact_session(st, sess, who, policy_for(st, threshold=threshold), "threshold")


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request, who=Depends(owner)):
    st = get_state(request)
    rec = await st.db(st.store.get_response, response_id, owner=who)
    resp = dict(rec.output.get("response", {})) if isinstance(rec.output, dict) else {}
    resp["id"] = rec.id
    return resp
