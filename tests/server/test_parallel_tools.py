"""parallel_tool_calls through the official clients: several calls in one turn (at most MAX_PARALLEL_CALLS)
under tool_choice "required", streamed and not, on chat and Responses; `parallel_tool_calls: false`
(Anthropic: `disable_parallel_tool_use`) gives at most one; Responses bodies report what was applied.
The random-weight model ends a reply where the grammar lets it, so the `no_eos` fixture takes EOS from
its logits: it then writes every call the grammar allows, MAX_PARALLEL_CALLS with parallel calls on,
one with them off."""

from __future__ import annotations

import json

import httpx
import pytest

from kvstrata.server import chat_format as cf
from kvstrata.tokenizer.tool_stream import ToolCallStream
from kvstrata.tokenizer.tools import MAX_PARALLEL_CALLS, TOOL_CALL_CLOSE, parse_tool_calls
# one small tool: eight calls and the prompt fit the tiny model's 1,024-token context
TOOLS = [{"type": "function", "function": {"name": "t", "parameters": {"type": "object", "properties": {}}}}]
MSGS = [{"role": "user", "content": "Time?"}]

SEEDS = range(3)


@pytest.fixture
def no_eos(tiny_server):
    """The engine's model never picks EOS (its logit is -inf) while the test runs."""
    def install(e):
        orig, eos = e.runner.execute, list(e.eos_ids)

        def execute(so):
            seqs, logits = orig(so)
            if seqs:
                logits[:, eos] = float("-inf")
            return seqs, logits
        e.runner.execute = execute

    tiny_server.state.aengine.call(install).result(30)
    yield
    tiny_server.state.aengine.call(lambda e: e.runner.__dict__.pop("execute")).result(30)
NAMES = {"t"}


def _calls(client, seed, **kw):
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                       temperature=1.0, seed=seed, max_tokens=440, **kw)
    return r.choices[0]


def test_required_with_parallel_calls_makes_several_bounded(client, no_eos):
    for seed in SEEDS:
        ch = _calls(client, seed)
        assert ch.finish_reason == "tool_calls"
        calls = ch.message.tool_calls
        assert len(calls) == MAX_PARALLEL_CALLS  # every call the grammar allows, and no more
        assert {c.function.name for c in calls} <= NAMES
        assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
        assert len({c.id for c in calls}) == len(calls)


def test_parallel_false_gives_exactly_one(client, no_eos):
    for seed in SEEDS:
        ch = _calls(client, seed, parallel_tool_calls=False)
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1


def test_parallel_calls_stream_as_separate_indexed_calls(client, no_eos):
    seed = 0
    whole = _calls(client, seed).message.tool_calls
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                                 temperature=1.0, seed=seed, max_tokens=440, stream=True))
    streamed: dict[int, dict] = {}
    for ch in chunks:
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            c = streamed.setdefault(d.index, {"id": d.id, "name": d.function.name, "args": ""})
            c["args"] += d.function.arguments or ""
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    assert sorted(streamed) == list(range(MAX_PARALLEL_CALLS)) and len(whole) == MAX_PARALLEL_CALLS
    assert [(c["name"], c["args"]) for c in streamed.values()] == [(w.function.name, w.function.arguments)
                                                                    for w in whole]
    assert all(c["id"] for c in streamed.values())


def test_responses_parallel_and_reported(client, no_eos):
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    kw = dict(model="tiny", input="Time?", tools=tools, tool_choice="required", temperature=1.0,
              max_output_tokens=440, store=False, extra_body={"seed": 1})
    r = client.responses.create(**kw)
    assert [o.type for o in r.output].count("function_call") == MAX_PARALLEL_CALLS and r.parallel_tool_calls is True
    one = client.responses.create(parallel_tool_calls=False, **kw)
    assert [o.type for o in one.output].count("function_call") == 1 and one.parallel_tool_calls is False
    evs = list(client.responses.create(stream=True, **kw))
    done = [e.item for e in evs if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert len(done) == MAX_PARALLEL_CALLS and evs[-1].response.parallel_tool_calls is True


def test_anthropic_disable_parallel_tool_use(tiny_server, no_eos):
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    body = {"model": "tiny", "max_tokens": 440, "messages": [{"role": "user", "content": "Weather?"}],
            "tools": tools, "temperature": 1.0, "seed": 0, "tool_choice": {"type": "any"}}
    for disable, n in ((True, 1), (False, MAX_PARALLEL_CALLS)):
        body["tool_choice"]["disable_parallel_tool_use"] = disable
        r = httpx.post(tiny_server.url + "/v1/messages", json=body, timeout=60).json()
        assert r["stop_reason"] == "tool_use"
        assert [b["type"] for b in r["content"]].count("tool_use") == n
    bad = dict(body, tool_choice={"type": "any", "disable_parallel_tool_use": "yes"})
    r = httpx.post(tiny_server.url + "/v1/messages", json=bad, timeout=60)
    assert r.status_code == 400 and "disable_parallel_tool_use" in r.json()["error"]["message"]


# -- without a grammar (tool_choice auto): the parser and the stop string keep the bound -------------
TWO = ('Sure. <tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>\n'
       '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}</tool_call> done')


def test_parser_and_stream_keep_at_most_max_calls():
    for limit, n in ((1, 1), (2, 2), (None, 2)):
        content, calls = parse_tool_calls(TWO, limit)
        s = ToolCallStream(limit)
        for i in range(1, len(TWO) + 1):
            s.feed(TWO[:i])
        _, s_content, s_calls = s.finish()
        assert len(calls) == len(s_calls) == n
        assert (content, [c["function"] for c in calls]) == (s_content, [c["function"] for c in s_calls])
        assert ("done" in content) == (limit is None)


def test_call_limit_and_stop_string():
    from kvstrata.core import SamplingParams

    assert cf.call_limit(None) == cf.call_limit(True) == MAX_PARALLEL_CALLS
    assert cf.call_limit(False) == 1 and cf.call_limit(True, {"type": "function", "function": {"name": "f"}}) == 1
    p = SamplingParams(stop=("x",))
    assert cf.stop_after_call(p, None, True, 1).stop == ("x", TOOL_CALL_CLOSE)  # auto, one call: stop there
    assert cf.stop_after_call(p, None, True, 8) is p and cf.stop_after_call(p, {"type": "tool_call"}, True, 1) is p
