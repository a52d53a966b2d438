"""BFCL-derived jobs: the converter against the real traces, our API implementations, and a small job
file run to completion on the default model (slow: it loads the default GGUF)."""

from __future__ import annotations

import json
import pytest

from benchmarks.bfcl.apis import GorillaFileSystem, MathAPI, MessageAPI
from benchmarks.bfcl.jobfile import IMPLEMENTED, build_job, data_dirs, find_data_dir, write_jsonl
from kvstrata.jobs.spec import JobSpec, read_job_file
from tests.jobs.conftest import run_job


@pytest.fixture(scope="module")
def data_dir():
    if not any((d / "BFCL_v4_multi_turn_base.json").is_file() for d in data_dirs()):
        pytest.skip(f"the BFCL traces are not in {data_dirs()} (set KVSTRATA_TRACE_DIR)")
    return find_data_dir(None)


@pytest.fixture
def store(tmp_path):
    from kvstrata.sessions import open_store

    s = open_store(tmp_path / "s.db")
    yield s
    s.close()


def test_converter_keeps_implemented_entries_with_their_docs_turns_and_state(data_dir, tmp_path):
    job = build_job(data_dir, limit=6, tool_choice="required")
    entries = {}
    for line in (data_dir / "BFCL_v4_multi_turn_base.json").read_text().splitlines():
        e = json.loads(line)
        entries[e["id"]] = e
    assert len(job["tasks"]) == 6
    for t in job["tasks"]:
        e = entries[t["id"]]
        assert set(e["involved_classes"]) <= set(IMPLEMENTED)
        assert [t["user"], *t["followups"]] == [turn[0]["content"] for turn in e["question"]]
        names = {d["function"]["name"] for d in t["tools"]}
        assert not names & set(e.get("excluded_function") or [])
        for d in t["tools"]:  # BFCL's "dict" / "float" became JSON Schema
            ps = d["function"]["parameters"]
            assert ps["type"] == "object"
            assert all(p.get("type") in (None, "string", "number", "integer", "boolean", "array", "object")
                       for p in ps["properties"].values())
        assert t["tool_state"] == {c: e["initial_config"].get(c) or {} for c in e["involved_classes"]}
    path = tmp_path / "bfcl.jsonl"
    write_jsonl(job, path)
    raw, _ = read_job_file(path)
    spec = JobSpec.parse(raw)
    assert [t.id for t in spec.tasks] == [t["id"] for t in job["tasks"]]


def test_file_system_state_and_snapshot_round_trip():
    fs = GorillaFileSystem({"root": {"alex": {"type": "directory", "contents": {
        "notes.txt": {"type": "file", "content": "b line\na Error here\nc"}}}}})
    assert fs.mkdir("archive") == {}
    assert "error" in fs.mkdir("archive")
    assert fs.mv("notes.txt", "archive")["result"].endswith("archive/notes.txt'")
    assert "error" in fs.cat("notes.txt")
    assert fs.cd("archive") == {"current_working_directory": "archive"}
    assert fs.grep("notes.txt", "Error") == {"matching_lines": ["a Error here"]}
    assert fs.sort("notes.txt") == {"sorted_content": "a Error here\nb line\nc"}
    assert fs.tail("notes.txt", 1) == {"last_lines": "c"}
    again = GorillaFileSystem(json.loads(json.dumps(fs.snapshot())))  # what a resumed agent gets
    assert again.pwd() == {"current_working_directory": "/alex/archive"}
    assert again.wc("notes.txt", "l") == {"count": 3, "type": "lines"}
    assert again.find("..", "notes") == {"matches": ["../archive/notes.txt"]}


def test_message_and_math_apis():
    m = MessageAPI({})
    assert "error" in m.send_message("USR002", "hi")  # not logged in
    assert m.message_login("USR001")["login_status"] is True
    assert m.send_message("USR002", "hi there")["sent_status"] is True
    assert m.view_messages_sent() == {"messages": {"USR002": ["hi there"]}}
    assert MessageAPI(m.snapshot()).search_messages("THERE")["results"] == [{"receiver_id": "USR002", "message": "hi there"}]
    math = MathAPI(None)
    assert math.divide(1, 0) == {"error": "Cannot divide by zero"}
    assert math.mean([1, 2, 3]) == {"result": 2.0}
    assert math.imperial_si_conversion(1, "inch", "cm") == {"result": 2.54}
    assert math.imperial_si_conversion(2.54, "cm", "inch") == {"result": 1.0}


@pytest.mark.slow
def test_bfcl_job_runs_to_completion_on_the_default_model(data_dir, store):
    from kvstrata.engine.async_engine import AsyncEngine
    from kvstrata.engine.llm_engine import LLMEngine

    job = build_job(data_dir, limit=12, max_turns=1, max_steps=2, max_tokens=40, tool_choice="required")
    # two file-system tasks: their prompts share the long tool-docs prefix, so it is computed once
    job["tasks"] = [t for t in job["tasks"] if t["metadata"]["involved_classes"] == ["GorillaFileSystem"]][:2]
    aeng = AsyncEngine(LLMEngine(model="default", kv_device_bytes="512M"))
    try:
        _, recs = run_job(aeng, store, job)
    finally:
        aeng.shutdown()
    assert sorted(recs) == sorted(t["id"] for t in job["tasks"])
    for r in recs.values():
        assert r["status"] == "done" and r["steps"] >= 1
        calls = [c for m in r["transcript"] if m["role"] == "assistant" for c in m.get("tool_calls") or []]
        tools = [m for m in r["transcript"] if m["role"] == "tool"]
        # the forced first step called one of the task's BFCL functions, and our implementation answered
        assert calls and len(tools) == len(calls)
        allowed = {d["function"]["name"] for t in job["tasks"] if t["id"] == r["task_id"] for d in t["tools"]}
        assert calls[0]["function"]["name"] in allowed
        assert tools[0]["content"] and tools[0]["tool_call_id"] == calls[0]["id"]


@pytest.mark.slow
def test_long_bfcl_task_compacts_past_a_4k_window(data_dir, store):
    """One agent task chaining the user turns of several BFCL entries outgrows a 4,096-token window (the
    default model's 8k halved, so the test runs in ~40 s instead of ~110): its whole history, rendered as
    one prompt, is longer than the window (so without compaction a step would end at context_length); by
    default it compacts and completes, and each step after a compaction finds the compacted prefix
    cached. The 18 tools' definitions take 2,918 of the 4,096 tokens, so this also checks that the default
    summary and recent sizes fit what the tools leave (with the fixed sizes of an 8k window no compaction
    could shorten this context, and the job ended at context_length)."""
    from benchmarks.bfcl.long_session import long_task
    from kvstrata.engine.async_engine import AsyncEngine
    from kvstrata.engine.llm_engine import LLMEngine
    from kvstrata.sessions import ANY_OWNER
    from kvstrata.tokenizer.tools import render_chat

    task = dict(max_steps=80, max_tokens=96, max_total_tokens=30000, tool_choice="required",
                sampling={"temperature": 0})
    on = long_task(data_dir, 3, **task)
    aeng = AsyncEngine(LLMEngine(model="default", quantization="auto", kv_device_bytes="512M", max_model_len=4096))
    try:
        window, tok = aeng.engine.max_model_len, aeng.engine.tokenizer
        _, after = run_job(aeng, store, on)
    finally:
        aeng.shutdown()
    (r_on,) = after.values()
    assert window == 4096
    assert r_on["status"] == "done" and r_on["finish_reason"] == "answered", r_on["finish_reason"]
    assert r_on["compactions"] >= 1
    msgs = r_on["transcript"]
    whole = [{k: v for k, v in m.items() if k != "kvstrata"} for m in msgs if m["role"] != "compaction"]
    tools = store.get_session(r_on["session_id"], owner=ANY_OWNER).tools or None  # as every step renders them
    whole_tokens = len(tok.encode(render_chat(tok, whole, tools=tools)))
    assert whole_tokens > window, whole_tokens  # 4,962 here
    assert sum(m["role"] == "user" for m in msgs) == 1 + len(on["tasks"][0]["followups"])  # the log keeps every turn
    for i, m in enumerate(msgs):
        if m["role"] == "compaction":
            k = next(x for x in msgs[i + 1:] if x["role"] == "assistant")["kvstrata"]
            assert k["history_tokens_kept"] == m["kvstrata"]["tokens_after"]
            assert k["cached_prompt_tokens"] >= (m["kvstrata"]["tokens_after"] // 16) * 16
    assert max(m["kvstrata"]["prompt_tokens"] for m in msgs if m["role"] == "assistant") <= window
