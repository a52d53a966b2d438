"""Job files, tool schemas and outputs, worker timeouts, results files and the non-TTY display."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from rich.console import Console

from kvstrata.core import KvstrataError
from kvstrata.jobs.progress import JobProgress, ProgressDisplay, summary_table
from kvstrata.jobs.results import ResultsFile
from kvstrata.jobs.spec import JobSpec, read_job_file
from kvstrata.jobs.tools import Toolset, render_output, schema_from_callable, tools_from_object
from kvstrata.jobs.workers import TaskTools, ToolWorkers


@pytest.mark.parametrize("job,msg", [
    ({"tasks": []}, "non-empty list"),
    ({"tasks": [{"user": "x", "max_step": 3}]}, "unknown keys \\['max_step'\\]"),
    ({"tasks": [{"system": "s"}]}, "needs `user`"),
    ({"tasks": [{"user": "x", "tool_choice": "always"}]}, "tool_choice"),
    ({"tasks": [{"user": "x", "max_steps": 0}]}, "max_steps"),
    ({"tasks": [{"user": "x", "id": "a"}, {"user": "y", "id": "a"}]}, "unique"),
    ({"tasks": [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]}, "end with a user"),
    ({"tools": [{"pythn": "m"}], "tasks": [{"user": "x"}]}, "tools\\[0\\]"),
    ({"mcp_servers": [{"args": []}], "tasks": [{"user": "x"}]}, "`command`"),
    ({"kvstrata_job": 2, "tasks": [{"user": "x"}]}, "version"),
])
def test_bad_job_files_say_what_is_wrong(job, msg):
    with pytest.raises(KvstrataError, match=msg):
        JobSpec.parse(job)


def test_jsonl_file_with_header_and_defaults(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text(json.dumps({"kvstrata_job": 1, "defaults": {"max_steps": 3}}) + "\n\n"
                 + json.dumps({"user": "a"}) + "\n" + json.dumps({"user": "b", "max_steps": 5}) + "\n")
    raw, digest = read_job_file(p)
    spec = JobSpec.parse(raw)
    assert [(t.id, t.max_steps) for t in spec.tasks] == [("task-0", 3), ("task-1", 5)]
    assert len(digest) == 64
    p.write_text(json.dumps({"user": "a"}) + "\n" + json.dumps({"kvstrata_job": 1}) + "\n")
    with pytest.raises(KvstrataError, match="first line"):
        read_job_file(p)
    p.write_text("{not json\n")
    with pytest.raises(KvstrataError, match="j.jsonl:1: not valid JSON"):
        read_job_file(p)


def test_schema_from_signature_and_docstring():
    def lookup(city: str, days: int = 3, units: list[str] | None = None) -> dict:
        """Weather forecast.

        Args:
            city: the city name
            days: how many days
        """

    desc, schema, ctx = schema_from_callable(lookup)
    assert desc == "Weather forecast." and ctx is None
    assert schema == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city name"},
        "days": {"type": "integer", "description": "how many days"},
        "units": {"type": "array", "items": {"type": "string"}}}}


def test_render_output_cases():
    assert render_output("plain", 100) == ("plain", None)
    assert render_output({"a": [1, 2.5]}, 100) == ('{"a": [1, 2.5]}', None)
    for bad in (object(), b"\xff", float("nan"), {1: 2}):
        content, err = render_output(bad, 100)
        assert content.startswith("Error:") and "not JSON" in err
    content, err = render_output("x" * 500, 100)
    assert err is None and content.startswith("x" * 100) and "500 characters" in content


class Counter(Toolset):
    name = "counter"

    def __init__(self, state=None):
        super().__init__(dict(state or {"n": 0}))

    def snapshot(self):
        return dict(self.state)

    def bump(self, by: int = 1) -> int:
        self.state["n"] += by
        return self.state["n"]


def _task(tools="*", state=None):
    return JobSpec.parse({"tasks": [{"user": "x", "tools": tools, "tool_state": state or {}}]}).tasks[0]


def test_toolset_state_is_per_task_snapshotted_and_restored():
    from kvstrata.jobs.tools import ToolContext

    reg = {t.name: t for t in tools_from_object(Counter, "test")}
    assert list(reg) == ["bump"]
    ctx = ToolContext("c1", "bump", "j", "t", 0, "s", 1)

    async def go():
        w = ToolWorkers(2)
        a = TaskTools(reg, _task(state={"counter": {"n": 10}}))
        b = TaskTools(reg, _task())
        o1 = await a.call("bump", '{"by": 5}', ctx, w, 5)
        o2 = await b.call("bump", "{}", ctx, w, 5)
        c = TaskTools(reg, _task())
        c.restore(o1.state)  # a resumed agent
        o3 = await c.call("bump", "{}", ctx, w, 5)
        bad = await a.call("bump", '{"by": 1, "extra": 2}', ctx, w, 5)
        notobj = await a.call("bump", "[1]", ctx, w, 5)
        unknown = await a.call("nope", "{}", ctx, w, 5)
        return o1, o2, o3, bad, notobj, unknown

    o1, o2, o3, bad, notobj, unknown = asyncio.run(go())
    assert (o1.content, o1.state, o2.content) == ("15", {"counter": {"n": 15}}, "1")
    assert o3.content == "16"
    assert "bad arguments" in bad.error and "JSON object" in notobj.error and "unknown tool 'nope'" in unknown.error


def test_a_hung_call_frees_its_worker_at_the_timeout():
    async def go():
        w = ToolWorkers(1)
        t0 = time.perf_counter()
        v, e, dt = await w.run(lambda secs: time.sleep(secs), {"secs": 5}, 0.2)
        v2, e2, _ = await w.run(lambda: "ok", {}, 2)  # the only slot is free again
        return time.perf_counter() - t0, e, v2, e2, w.stats

    took, e, v2, e2, stats = asyncio.run(go())
    assert isinstance(e, TimeoutError) and v2 == "ok" and e2 is None and took < 4
    assert stats["abandoned"] == 1 and stats["timeouts"] == 1


def test_results_file_append_and_rewrite_write_each_task_once(tmp_path):
    rf = ResultsFile(tmp_path / "r.jsonl")
    rf.rewrite([{"task_index": 1, "x": 1}])
    rf.append({"task_index": 1, "x": 1})  # already there: skipped
    rf.append({"task_index": 0, "x": 0})
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [x["task_index"] for x in lines] == [1, 0]
    rf.rewrite(sorted(lines, key=lambda r: r["task_index"]))
    assert [json.loads(x)["task_index"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == [0, 1]


def test_display_without_a_terminal_prints_plain_lines():
    buf = io.StringIO()
    con = Console(file=buf, width=200)
    assert not con.is_terminal
    p = JobProgress("job_x", total=3)
    d = ProgressDisplay(p, con, every_s=0.0)
    d.start()
    p.task_phase(0, "generating", "s1", [1, 2, 3])
    p.task_phase(1, "tools", "s2", [1])
    p.add_generated(10)
    p.kv_by_tier = {"device": 32, "disk": 16}
    d.refresh()
    p.task_phase(0, "done", "s1")
    d.refresh()
    d.stop()
    out = buf.getvalue()
    assert "\x1b[" not in out  # no terminal control codes
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("job job_x: 0/3 done")
    assert "1 running, 1 waiting on tools" in lines[1] and "device=32, disk=16" in lines[1]
    assert lines[2].startswith("job job_x: 1/3 done")
    buf2 = io.StringIO()
    Console(file=buf2, width=150).print(summary_table([
        {"task_index": 0, "task_id": "a", "status": "done", "finish_reason": "answered", "steps": 2, "tool_calls": 1,
         "tool_errors": 0, "prompt_tokens": 100, "cached_prompt_tokens": 50, "completion_tokens": 7,
         "timings": {"wall_s": 1.5}}]))
    assert "answered" in buf2.getvalue() and "1 tasks" in buf2.getvalue()
