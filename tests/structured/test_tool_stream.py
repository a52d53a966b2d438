"""ToolCallStream: the events of an output fed in growing pieces add up to what parse_tool_calls gives
the finished text (content, call names, argument text), and arguments arrive in several fragments."""

from __future__ import annotations

import random

import pytest

from kvstrata.tokenizer.tool_stream import ArgsDelta, CallStart, TextDelta, ToolCallStream
from kvstrata.tokenizer.tools import parse_tool_calls

CASES = [
    'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    '<tool_call>\n  {"name":"add","arguments":{"a":1,"b":2}}\n</tool_call> Done.',
    "plain text  with < and <tool stuff  ",
    '<tool_call>{"arguments": {}, "name": "x"}</tool_call>',  # other key order: announced whole at the close
    "<tool_call>bad</tool_call> after",  # not a call: stays text
    'ok <tool_call>{"name": "f", "arguments": {"z": 1}}\n',  # a last tag left open
    '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',  # arguments as a JSON string
    '  \n<tool_call>{"name": "f", "arguments": {"a": [1, {"b": "c\\"}"}]}}</tool_call>',
    '<tool_call>{"name": "f", "parameters": {"q": "<tool_call>"}}</tool_call>',
]


def _run(text: str, rng: random.Random):
    s, evs, i = ToolCallStream(), [], 0
    while i < len(text):
        i += rng.randint(1, 4)
        evs += s.feed(text[:i])
    last, content, calls = s.finish()
    return evs + last, content, calls


@pytest.mark.parametrize("text", CASES)
def test_stream_adds_up_to_the_parse(text):
    rng = random.Random(0)
    want_content, want_calls = parse_tool_calls(text)
    for _ in range(25):
        evs, content, calls = _run(text, rng)
        assert ("".join(e.text for e in evs if isinstance(e, TextDelta)) or None) == content
        assert content == want_content
        assert [c["function"] for c in calls] == [c["function"] for c in want_calls]
        for k, c in enumerate(calls):
            starts = [e for e in evs if isinstance(e, CallStart) and e.index == k]
            assert [(e.id, e.name) for e in starts] == [(c["id"], c["function"]["name"])]
            frags = [e.text for e in evs if isinstance(e, ArgsDelta) and e.index == k]
            assert "".join(frags) == c["function"]["arguments"]
            # the call is announced before any of its arguments
            assert evs.index(starts[0]) < min(evs.index(e) for e in evs if isinstance(e, ArgsDelta) and e.index == k)


def test_arguments_stream_before_the_call_closes():
    s = ToolCallStream()
    head = 'Sure. <tool_call>{"name": "f", "arguments": {"city": "Par'
    evs = s.feed("Sure.") + s.feed("Sure. <tool_") + s.feed(head)
    assert [type(e) for e in evs] == [TextDelta, CallStart, ArgsDelta]
    assert evs[0].text == "Sure." and evs[1].name == "f" and evs[2].text == '{"city": "Par'
    more = s.feed(head + 'is"}}</tool_call>')
    assert [e.text for e in more] == ['is"}']
    _, content, calls = s.finish()
    assert content == "Sure." and calls[0]["function"]["arguments"] == '{"city": "Paris"}'


def test_partial_open_tag_is_held_back():
    s = ToolCallStream()
    assert [e.text for e in s.feed("Hi <tool")] == ["Hi"]
    assert s.feed("Hi <toolbox") == [TextDelta(" <toolbox")]
