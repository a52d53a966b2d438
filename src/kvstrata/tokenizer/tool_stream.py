"""Tool calls parsed while they are generated: text deltas, then tool-call deltas (id and name first,
then argument fragments) as soon as the output opens a call.

`ToolCallStream.feed(text)` takes the whole output so far (each time a little longer) and returns the
events it newly allows; `finish()` returns the last ones and the final (content, calls). What the
events add up to is what `tools.parse_tool_calls` gives the finished text, with the ids the stream
announced:

- content: the text outside the tags, stripped at both ends (whitespace is held back until more text
  follows it), never a proper prefix of `<tool_call>` while that tag may still be completing;
- a call in the usual `{"name": ..., "arguments": {...}}` order is announced once its name is whole and
  its arguments object is streamed as written (parse_tool_calls keeps that text too), up to where the
  object closes; any other shape is announced whole when its tag closes;
- with `max_calls`, the output ends after that many calls (as parse_tool_calls(text, max_calls)):
  nothing after the last one kept goes out, and `full` tells the caller it may stop generating;
- a tag whose body turns out not to be a call is text, as in parse_tool_calls. A streamed call whose
  arguments then fail to parse (possible only when decoding is unconstrained) stays a call with the
  arguments sent: the stream cannot take events back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from kvstrata.tokenizer.tools import CALL_HEAD, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, _as_call, new_call_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int  # 0, 1, ... in order of the calls
    id: str
    name: str


@dataclass(frozen=True)
class ArgsDelta:
    index: int
    text: str


Event = TextDelta | CallStart | ArgsDelta


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may still become it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def json_object_end(text: str) -> int | None:
    """The index just past the JSON object (or array) that `text` starts with, None while it is open."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class _Call:
    def __init__(self, index: int, body_start: int) -> None:
        self.index = index
        self.body_start = body_start  # where the text after <tool_call> begins
        self.id: str | None = None
        self.name = ""
        self.args_start: int | None = None  # set once announced with a streamable head
        self.args_sent = ""


class ToolCallStream:
    """One choice's output, parsed for `<tool_call>` tags as it grows (see the module docstring)."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.pos = 0  # text before it is handled
        self.call: _Call | None = None  # the open call
        self.calls: list[dict] = []  # finished calls, OpenAI shape
        self.content = ""  # content sent so far
        self.pending_ws = ""  # whitespace held back after the content sent
        self.text = ""

    # -- text ----------------------------------------------------------------------------------------
    def _emit_text(self, seg: str, out: list[Event]) -> None:
        if not self.content:
            seg = seg.lstrip()
        core = seg.rstrip()
        if core:
            out.append(TextDelta(self.pending_ws + core))
            self.content += self.pending_ws + core
            self.pending_ws = seg[len(core):]
        elif self.content:
            self.pending_ws += seg

    # -- calls ---------------------------------------------------------------------------------------
    def _announce(self, c: _Call, name: str, out: list[Event]) -> None:
        c.id, c.name = new_call_id(), name
        out.append(CallStart(c.index, c.id, name))

    def _stream_args(self, c: _Call, upto: int, out: list[Event]) -> None:
        assert c.args_start is not None
        avail = self.text[c.args_start:upto]
        end = json_object_end(avail)
        new = (avail if end is None else avail[:end])[len(c.args_sent):]
        if new:
            c.args_sent += new
            out.append(ArgsDelta(c.index, new))

    def _open_progress(self, c: _Call, out: list[Event]) -> None:
        """An open call: announce it once its head is whole, then stream its arguments."""
        safe = len(self.text) - _partial_suffix(self.text, TOOL_CALL_CLOSE)
        if c.id is None:
            head = CALL_HEAD.match(self.text, c.body_start, safe)
            if head is None:
                return
            try:
                name = json.loads('"' + head.group(1) + '"')
            except ValueError:
                return
            if not name:
                return
            self._announce(c, name, out)
            c.args_start = head.end()
        self._stream_args(c, safe, out)

    def _close(self, c: _Call, body_end: int, tag_end: int, out: list[Event]) -> None:
        body = self.text[c.body_start:body_end]
        call = _as_call(body.strip())
        if call is None and c.id is None:  # not a call after all: text, as parse_tool_calls keeps it
            self._emit_text(self.text[c.body_start - len(TOOL_CALL_OPEN):tag_end], out)
        else:
            if call is None:
                log.warning("a streamed tool call %r ended with arguments that do not parse; kept as sent", c.name)
                call = {"type": "function", "function": {"name": c.name, "arguments": c.args_sent}}
            if c.id is None:
                self._announce(c, call["function"]["name"], out)
            args = call["function"]["arguments"]
            if args.startswith(c.args_sent) and len(args) > len(c.args_sent):
                out.append(ArgsDelta(c.index, args[len(c.args_sent):]))
            elif not args.startswith(c.args_sent):
                log.warning("tool call %r: arguments streamed differ from the parsed ones", c.name)
                args = c.args_sent
            self.calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}})
        self.call = None
        self.pos = tag_end

    # -- driving -------------------------------------------------------------------------------------
    @property
    def full(self) -> bool:
        """Whether the output already holds `max_calls` calls (what follows is dropped)."""
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def feed(self, text: str) -> list[Event]:
        """The events the output so far newly allows; `text` extends the previous one."""
        if not text.startswith(self.text):
            raise ValueError("ToolCallStream.feed: the text must extend the previous text")
        self.text = text
        out: list[Event] = []
        while not self.full:
            c = self.call
            if c is None:
                j = text.find(TOOL_CALL_OPEN, self.pos)
                if j < 0:
                    safe = len(text) - _partial_suffix(text[self.pos:], TOOL_CALL_OPEN)
                    self._emit_text(text[self.pos:safe], out)
                    self.pos = max(self.pos, safe)
                    return out
                self._emit_text(text[self.pos:j], out)
                self.call = _Call(len(self.calls), j + len(TOOL_CALL_OPEN))
                self.pos = self.call.body_start
                continue
            k = text.find(TOOL_CALL_CLOSE, c.body_start)
            if k < 0:
                self._open_progress(c, out)
                return out
            self._close(c, k, k + len(TOOL_CALL_CLOSE), out)
        return out

    def finish(self) -> tuple[list[Event], str | None, list[dict]]:
        """The last events of the finished output (a last tag left open counts as closed, and text held
        back goes out), then the final content (None when empty) and calls."""
        out: list[Event] = []
        if self.call is not None and not self.full:
            self._close(self.call, len(self.text), len(self.text), out)
        elif not self.full:
            self._emit_text(self.text[self.pos:], out)
            self.pos = len(self.text)
        return out, (self.content or None), self.calls
