"""A constraint llguidance gives up on is a failure, never a clean stop (issue 19, defect 6).

A schema whose required recursion never ends makes the parser give up after a token or two ("Too
many items"); the matcher can then only end the sequence with EOS. That output ("<" of a tool call,
'{"' of an object) used to come back as 200 with finish_reason stop.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.test_errors import assert_openai_error

ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}  # no finite instance
TOOLS = [{"type": "function", "function": {"name": "tree", "parameters": ENDLESS}}]
MSGS = [{"role": "user", "content": "Hello"}]


def _chat(srv, **body) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": MSGS, "max_tokens": 40, "temperature": 0, **body}, timeout=120)


def test_check_output_tells_a_complete_match_from_a_failed_one(tiny_engine):
    from kvstrata.engine.structured import check_output

    tok, eos = tiny_engine.engine.tokenizer, tiny_engine.engine.eos_ids
    spec = {"type": "json_schema", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                              "required": ["n"]}}
    whole = tok.encode('{"n": 42}', add_special_tokens=False)
    assert check_output(spec, tok, whole + [min(eos)], eos) is None
    assert "before the grammar is complete" in check_output(spec, tok, whole[:-1], eos)
    assert check_output({"type": "json_schema", "schema": ENDLESS}, tok, tok.encode('{"a": ', add_special_tokens=False)
                        + [min(eos)], eos) is not None


def test_a_forced_tool_call_the_parser_gives_up_on_is_not_a_clean_stop(tiny_server):
    r = _chat(tiny_server, tools=TOOLS, tool_choice="required")
    err = assert_openai_error(r, 400, "constraint_failed")
    assert "could not be enforced" in err["message"] and "Too many items" in err["message"]
    ok = _chat(tiny_server, tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}}}], tool_choice="required",
               max_tokens=200)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "tool_calls"


def test_a_schema_the_parser_gives_up_on_is_not_a_clean_stop(tiny_server):
    fmt = {"type": "json_schema", "json_schema": {"name": "endless", "schema": ENDLESS}}
    assert_openai_error(_chat(tiny_server, response_format=fmt), 400, "constraint_failed")
    events = []
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", timeout=120,
                      json={"model": "tiny", "messages": MSGS, "max_tokens": 40, "temperature": 0, "stream": True,
                            "response_format": fmt}) as r:
        if r.status_code != 200:  # failed by its first output: still an HTTP status
            r.read()
            assert_openai_error(r, 400, "constraint_failed")
            return
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    assert "stop" not in finishes and events[-1]["error"]["code"] == "constraint_failed"


def test_a_session_turn_that_fails_its_constraint_appends_nothing(tiny_server):
    url = tiny_server.url
    s = httpx.post(url + "/v1/sessions", json={"tools": TOOLS}).json()
    r = httpx.post(url + f"/v1/sessions/{s['id']}/generate", timeout=120,
                   json={"messages": MSGS, "tool_choice": "required", "max_tokens": 40, "temperature": 0})
    assert_openai_error(r, 400, "constraint_failed")
    after = httpx.get(url + f"/v1/sessions/{s['id']}").json()
    assert after["messages"] == [] and after["version"] == s["version"]


@pytest.mark.parametrize("stop", [["{"], ['"']])
def test_a_stop_string_the_client_chose_is_its_own_stop(tiny_server, stop):
    """Cut by the client's stop string, a constrained output is incomplete on purpose: a plain stop."""
    fmt = {"type": "json_object"}
    r = _chat(tiny_server, response_format=fmt, stop=stop)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
