"""MCP servers over stdio (a real server process, our tests/jobs/mcp_test_server.py, via the `mcp`
package): tools listed from the server, calls answered by it, its errors and a dead server reported
to the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvstrata.core import KvstrataError

from .conftest import forced, run_job

SERVER = str(Path(__file__).with_name("mcp_test_server.py"))
SMALL = {"type": "object", "properties": {"a": {"type": "integer", "enum": [1, 2, 3]},
                                           "b": {"type": "integer", "enum": [10, 20]}}, "required": ["a", "b"]}


def test_mcp_tools_round_trip_and_errors(tiny_aeng, store):
    job = {"mcp_servers": [{"name": "calc", "command": sys.executable, "args": [SERVER], "tool_prefix": "calc_"}],
           "tasks": [{"id": "add", "user": "add", "max_tokens": 96, "max_steps": 2, "tool_choice": forced("calc_add"),
                      "tools": [{"type": "function", "function": {"name": "calc_add", "description": "Add.",
                                                                  "parameters": SMALL}}]},
                     {"id": "fail", "user": "fail", "max_tokens": 64, "max_steps": 2, "tools": ["calc_fail"],
                      "tool_choice": "required"}]}
    _, recs = run_job(tiny_aeng, store, job)
    r = recs["add"]
    call = next(c for m in r["transcript"] if m["role"] == "assistant" for c in m.get("tool_calls") or [])
    args = json.loads(call["function"]["arguments"])
    tool = next(m for m in r["transcript"] if m["role"] == "tool")
    assert tool["content"] == f"sum={args['a'] + args['b']}" and tool["kvstrata"]["error"] is None
    assert r["status"] == "done"
    r = recs["fail"]
    tool = next(m for m in r["transcript"] if m["role"] == "tool")
    assert r["status"] == "done" and "failed on purpose" in tool["kvstrata"]["error"]
    assert tool["content"].startswith("Error:")


def test_an_mcp_server_that_does_not_start_is_a_clear_error(tiny_aeng, store, tmp_path):
    bad = tmp_path / "crash.py"
    bad.write_text("import sys; sys.exit(3)\n")
    job = {"mcp_servers": [{"name": "broken", "command": sys.executable, "args": [str(bad)], "startup_timeout_s": 20}],
           "tasks": [{"user": "x"}]}
    with pytest.raises(KvstrataError, match="MCP server 'broken'"):
        run_job(tiny_aeng, store, job)


def test_servers_refuse_mcp_commands_and_module_paths(tiny_aeng, store):
    with pytest.raises(KvstrataError, match="MCP"):
        run_job(tiny_aeng, store, {"mcp_servers": [{"command": "x"}], "tasks": [{"user": "x"}]}, allow_mcp=False)
    with pytest.raises(KvstrataError, match="module paths are not allowed"):
        run_job(tiny_aeng, store, {"tools": [{"python": "os:system"}], "tasks": [{"user": "x"}]},
                allow_python_modules=False)
