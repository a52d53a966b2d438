"""Streaming with tools through the official openai client: text goes out as it is generated (not held
back to the end), and a tool call streams its id and name first, then its arguments in several
fragments that add up to the call the same request gives non-streamed."""

from __future__ import annotations

import json
import time

from tests.server.test_structured import MSGS, TOOLS


def _timed(stream):
    t0, out = time.monotonic(), []
    for ch in stream:
        out.append((time.monotonic() - t0, ch))
    return out


def test_text_streams_before_the_reply_ends_with_tools(client, slow_steps):
    # a random-weight model never opens a tool call, so with tools active (auto) its reply is text
    evs = _timed(client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, temperature=0,
                                                max_tokens=48, stream=True, extra_body={"ignore_eos": True}))
    content = [(t, ch) for t, ch in evs if ch.choices and ch.choices[0].delta.content]
    end = max(t for t, ch in evs if ch.choices and ch.choices[0].finish_reason)
    assert len(content) >= 5  # as generated, not one delta at the end
    assert content[0][0] < end - 0.2  # 48 steps of >= 10 ms: the first text came well before the end
    text = "".join(ch.choices[0].delta.content for _, ch in content)
    whole = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, temperature=0, max_tokens=48,
                                           extra_body={"ignore_eos": True})
    assert text == whole.choices[0].message.content


def test_tool_call_streams_arguments_in_fragments(client):
    kw = dict(model="tiny", messages=MSGS, tools=TOOLS, temperature=0, max_tokens=110,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    frags = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(frags) >= 2 and all(d.id is None for d in deltas[1:])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1
    call = whole.message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("get_weather", "".join(frags))
    assert isinstance(json.loads(call.function.arguments), dict)


def test_responses_stream_text_with_tools(client):
    evs = list(client.responses.create(model="tiny", input="Hello there", tools=[
        {"type": "function", "name": "get_time", "parameters": TOOLS[1]["function"]["parameters"]}],
        max_output_tokens=24, temperature=0, stream=True))
    kinds = [e.type for e in evs]
    deltas = [e.delta for e in evs if e.type == "response.output_text.delta"]
    assert len(deltas) >= 3 and kinds.index("response.output_text.delta") < kinds.index("response.output_text.done")
    assert evs[-1].response.output_text == "".join(deltas)
