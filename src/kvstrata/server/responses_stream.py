"""The Responses API event stream (`stream: true` on POST /v1/responses).

response.created / in_progress, then the output items in the order the reply makes them: a message
item as soon as text comes (output_text.delta as generated), and with tools active a function_call
item as soon as the reply opens a tool call (tokenizer/tool_stream.py), its arguments following as
function_call_arguments.delta fragments; then each item's done events, and response.completed (or
.incomplete). The turn is stored, under the id response.created announced, with the call ids the
stream sent; a client that disconnects first aborts it and nothing is stored.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any, AsyncIterator

from kvstrata.core import RequestOutput
from kvstrata.server import chat_format as cf
from kvstrata.server.common import new_id, outputs
from kvstrata.server.errors import to_api_error
from kvstrata.server.protocol import ResponsesRequest
from kvstrata.server.responses import _message_item, _response, _response_id, _status, _store, _text_part
from kvstrata.server.state import ServerState
from kvstrata.server.turns import HttpTurn, finish_turn
from kvstrata.sessions import Session
from kvstrata.tokenizer.tool_stream import ArgsDelta, CallStart, Event, TextDelta, ToolCallStream

log = logging.getLogger(__name__)


class PlainStream:
    """ToolCallStream's interface for a reply without tools: every new piece of text is a text delta."""

    def __init__(self) -> None:
        self.text = ""

    def feed(self, text: str) -> list[Event]:
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += delta
        return [TextDelta(delta)] if delta else []

    def finish(self) -> tuple[list[Event], str | None, list[dict]]:
        return [], self.text, []


class _Items:
    """The output items as the stream opens them, and the events that open, extend and close them."""

    def __init__(self, ev) -> None:
        self.ev = ev
        self.items: list[dict[str, Any]] = []
        self.msg: int | None = None  # output index of the message item
        self.calls: dict[int, int] = {}  # call index -> output index

    def open_message(self):
        self.msg = len(self.items)
        item = _message_item("")
        self.items.append(item)
        yield self.ev("response.output_item.added", output_index=self.msg,
                      item={**item, "status": "in_progress", "content": []})
        yield self.ev("response.content_part.added", item_id=item["id"], output_index=self.msg, content_index=0,
                      part=_text_part(""))

    def on(self, e: Event):
        if isinstance(e, TextDelta):
            if self.msg is None:
                yield from self.open_message()
            item = self.items[self.msg]
            item["content"][0]["text"] += e.text
            yield self.ev("response.output_text.delta", item_id=item["id"], output_index=self.msg, content_index=0,
                          delta=e.text, logprobs=[])
        elif isinstance(e, CallStart):
            i = self.calls[e.index] = len(self.items)
            item = {"type": "function_call", "id": new_id("fc_"), "call_id": e.id, "name": e.name, "arguments": "",
                    "status": "in_progress"}
            self.items.append(item)
            yield self.ev("response.output_item.added", output_index=i, item=dict(item))
        elif isinstance(e, ArgsDelta):
            i = self.calls[e.index]
            self.items[i]["arguments"] += e.text
            yield self.ev("response.function_call_arguments.delta", item_id=self.items[i]["id"], output_index=i,
                          delta=e.text)

    def close(self, content: str | None, calls: list[dict]):
        """Done events for every item, with the final content and calls (a message item even when empty)."""
        if self.msg is None and (content or not calls):
            yield from self.open_message()
        for i, item in enumerate(self.items):
            if item["type"] == "message":
                item["content"][0]["text"] = text = content or ""
                yield self.ev("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                              text=text, logprobs=[])
                yield self.ev("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                              part=item["content"][0])
            else:
                k = next(k for k, j in self.calls.items() if j == i)
                item["arguments"], item["status"] = calls[k]["function"]["arguments"], "completed"
                yield self.ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                              name=item["name"], arguments=item["arguments"])
            yield self.ev("response.output_item.done", output_index=i, item=item)


async def events(st: ServerState, body: ResponsesRequest, who: Any, sess: Session, turn_no: int,
                 branched_from: str | None, new_msgs: list[dict[str, Any]], plan: HttpTurn, first: RequestOutput,
                 agen: AsyncIterator[RequestOutput], input_from: int) -> AsyncIterator[str]:
    seq = itertools.count()

    def ev(kind: str, **fields: Any) -> str:
        data = json.dumps({"type": kind, "sequence_number": next(seq), **fields}, ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n"

    rid = _response_id(body)
    start = _response(body, rid, status="in_progress", output=[], turn=None, session_id=sess.id,
                      branched_from=branched_from)
    yield ev("response.created", response=start)
    yield ev("response.in_progress", response=start)
    parser = ToolCallStream(plan.max_calls) if plan.parse_tools else PlainStream()
    items = _Items(ev)
    last = first
    try:
        async for out in outputs(first, agen):
            last = out
            for e in parser.feed(out.outputs[0].text):
                for s in items.on(e):
                    yield s
        st.metrics.observe_output(last)
        tail, content, calls = parser.finish()
        for e in tail:
            for s in items.on(e):
                yield s
        parsed = cf.message_of(content, calls) if plan.parse_tools else cf.assistant_message(content or "", False)
        async with st.session_lock(sess.id):
            turn = await finish_turn(st, sess, who, new_msgs, plan, last, parsed=parsed,
                                     persist=body.store or body.conversation is not None)
        for s in items.close(content, calls):
            yield s
        status = _status(turn)
        resp = _response(body, rid, status=status, output=items.items, turn=turn, session_id=sess.id,
                         branched_from=branched_from)
        await _store(st, body, who, sess, turn_no, turn, resp, input_from)
    except Exception as e:  # after the headers went out, an error travels as an event
        log.warning("responses stream %s failed: %s", rid, e)
        a = to_api_error(e)
        yield ev("error", code=a.code or str(a.status), message=a.message, param=a.param)
        return
    yield ev("response.completed" if status == "completed" else "response.incomplete", response=resp)
