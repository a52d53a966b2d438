"""The Messages API event stream (`stream: true` on POST /v1/messages), in Anthropic's event types.

message_start (the message with empty content and the input usage), then per content block
content_block_start / content_block_delta (`text_delta`, or `input_json_delta` fragments of a
tool_use block's input, as generated: tokenizer/tool_stream.py) / content_block_stop, then
message_delta (stop_reason, stop_sequence, output usage) and message_stop. An error after the stream
began is an `error` event. The turn is recorded (durable sessions) with the tool_use ids the stream sent.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

from kvstrata.core import RequestOutput
from kvstrata.server import anthropic_format as af
from kvstrata.server import chat_format as cf
from kvstrata.server.common import outputs, usage
from kvstrata.server.errors import anthropic_error_type, to_api_error
from kvstrata.server.state import ServerState
from kvstrata.server.turns import HttpTurn, finish_turn
from kvstrata.sessions import Session
from kvstrata.tokenizer.tool_stream import ArgsDelta, CallStart, Event, TextDelta, ToolCallStream

log = logging.getLogger(__name__)


def ev(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"


class _Blocks:
    """Content blocks opened and closed as the stream's events come."""

    def __init__(self) -> None:
        self.n = 0  # blocks opened
        self.open: tuple[str, int] | None = None  # ("text", -1) or ("tool_use", call index)

    def _close(self):
        if self.open is not None:
            yield ev("content_block_stop", index=self.n - 1)
            self.open = None

    def _start(self, key: tuple[str, int], block: dict[str, Any]):
        yield from self._close()
        self.open = key
        self.n += 1
        yield ev("content_block_start", index=self.n - 1, content_block=block)

    def on(self, e: Event):
        if isinstance(e, TextDelta):
            if self.open != ("text", -1):
                yield from self._start(("text", -1), {"type": "text", "text": ""})
            yield ev("content_block_delta", index=self.n - 1, delta={"type": "text_delta", "text": e.text})
        elif isinstance(e, CallStart):
            yield from self._start(("tool_use", e.index), {"type": "tool_use", "id": e.id, "name": e.name, "input": {}})
        elif isinstance(e, ArgsDelta):
            assert self.open == ("tool_use", e.index)
            yield ev("content_block_delta", index=self.n - 1, delta={"type": "input_json_delta", "partial_json": e.text})

    def finish(self):
        yield from self._close()


async def events(st: ServerState, model: str, mid: str, sess: Session, who: Any, new_msgs: list[dict[str, Any]],
                 turn: HttpTurn, first: RequestOutput, agen: AsyncIterator[RequestOutput],
                 persist: bool) -> AsyncIterator[str]:
    start_usage = af.usage(usage(first))
    yield ev("message_start", message={
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {**start_usage, "output_tokens": 0}})
    parser = ToolCallStream(turn.max_calls) if turn.parse_tools else None
    blocks = _Blocks()
    sent, last = "", first
    try:
        async for out in outputs(first, agen):
            last = out
            text = out.outputs[0].text
            if parser is not None:
                evs = parser.feed(text)
            else:
                evs, sent = ([TextDelta(text[len(sent):])] if len(text) > len(sent) else []), text
            for e in evs:
                for s in blocks.on(e):
                    yield s
        st.metrics.observe_output(last)
        if parser is not None:
            tail, content, calls = parser.finish()
            for e in tail:
                for s in blocks.on(e):
                    yield s
            parsed = cf.message_of(content, calls)
        else:
            parsed = cf.assistant_message(last.outputs[0].text, False)
        for s in blocks.finish():
            yield s
        async with st.session_lock(sess.id):
            res = await finish_turn(st, sess, who, new_msgs, turn, last, persist=persist, parsed=parsed)
        reason, seq = af.stop_of(last.outputs[0], res.has_calls)
        yield ev("message_delta", delta={"stop_reason": reason, "stop_sequence": seq},
                 usage={"output_tokens": res.usage["completion_tokens"]})
        yield ev("message_stop")
    except Exception as e:  # after the headers went out, an error travels as an event
        log.warning("messages stream %s failed: %s", mid, e)
        a = to_api_error(e)
        yield ev("error", error={"type": anthropic_error_type(a.status), "message": a.message})
