"""Compaction that keeps the cache, on a tiny random-weight model with a 512-token window: through
Responses' context_management and /v1/responses/compact (the openai client), the sessions endpoint, and
agent jobs, which compact instead of ending at context_length. The log keeps every original message;
the turn after a compaction finds the compacted prefix cached (and, with a disk tier, on disk)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from kvstrata.sessions import hash_api_key
from tests.memory.conftest import KEY_A, WINDOW, memory_server

FILLER = "the quick brown fox jumps over the lazy dog and then it rests "  # ~ a dozen tiny-model tokens each


def _session(srv, sid):
    return httpx.get(f"{srv.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30).json()


def test_context_management_compacts_a_conversation_and_the_next_turn_is_cached(short_engine, tmp_path):
    from kvstrata.memory import CompactionPolicy

    policy = CompactionPolicy(keep_recent_tokens=40, summary_max_tokens=32, request_class="interactive")
    with memory_server(short_engine, str(tmp_path / "s.db"), policy=policy) as srv:
        a = srv.client(KEY_A)
        conv = a.conversations.create()
        cm = [{"type": "compaction", "compact_threshold": 380}]
        sizes, compacted_at = [], None
        for i in range(12):
            r = a.responses.create(model="tiny", input=f"turn {i}: " + FILLER * 2, conversation=conv.id,
                                   max_output_tokens=16, temperature=0, extra_body={"context_management": cm})
            sizes.append(r.usage.input_tokens)
            items = list(a.conversations.items.list(conv.id, order="asc", limit=100))
            if compacted_at is None and any(i.type == "compaction" for i in items):
                compacted_at = i
                break
        assert compacted_at is not None, f"never compacted; prompt sizes {sizes}"
        # without compaction this conversation would have outgrown the window: it did not
        assert max(sizes) <= WINDOW
        s = _session(srv, conv.id)
        mark = [m for m in s["messages"] if m["role"] == "compaction"][-1]
        k = mark["kvstrata"]
        assert k["tokens_after"] < k["tokens_before"] and k["summarized_messages"] >= 2
        # every original message is still in the log, in order
        users = [m["content"] for m in s["messages"] if m["role"] == "user"]
        assert [u.split(":")[0] for u in users] == [f"turn {j}" for j in range(compacted_at + 1)]
        # the turn that triggered it ran on the compacted prefix, cached when it was computed once
        bs = 16
        assert r.usage.input_tokens_details.cached_tokens >= (k["tokens_after"] // bs) * bs - bs
        r2 = a.responses.create(model="tiny", input="one more", conversation=conv.id, max_output_tokens=4, temperature=0)
        assert r2.usage.input_tokens < k["tokens_before"]
        assert r2.usage.input_tokens_details.cached_tokens >= (k["tokens_after"] // bs) * bs


def test_responses_compact_endpoint_and_continue(short_engine, tmp_path):
    with memory_server(short_engine, str(tmp_path / "s.db")) as srv:
        a = srv.client(KEY_A)
        r = a.responses.create(model="tiny", input="first " + FILLER * 3, max_output_tokens=12, temperature=0)
        for i in range(3):
            r = a.responses.create(model="tiny", input=f"more {i} " + FILLER * 3, previous_response_id=r.id,
                                   max_output_tokens=12, temperature=0)
        before = r.usage.input_tokens + r.usage.output_tokens
        c = a.responses.compact(model="tiny", previous_response_id=r.id, extra_body={"keep_recent_tokens": 40,
                                                                                       "summary_max_tokens": 24})
        assert c.object == "response.compaction"
        assert c.output[-1].type == "compaction" and c.output[-1].encrypted_content
        nxt = a.responses.create(model="tiny", input="continue", previous_response_id=c.id, max_output_tokens=4,
                                 temperature=0)
        assert nxt.usage.input_tokens < before
        after = c.to_dict()["tokens_after"]  # (extension field) the compacted context's length
        assert after < before
        assert nxt.usage.input_tokens_details.cached_tokens >= (after // 16) * 16
        # nothing to compact is a clear 400, not a 500
        fresh = a.responses.create(model="tiny", input="hi", max_output_tokens=2, temperature=0)
        h = {"Authorization": f"Bearer {KEY_A}"}
        bad = httpx.post(f"{srv.url}/v1/responses/compact", headers=h, timeout=60,
                         json={"model": "tiny", "previous_response_id": fresh.id, "keep_recent_tokens": 10_000})
        assert bad.status_code == 400, bad.text


def test_session_compact_writes_the_new_prefix_down_to_disk(tiny_llama, tmp_path):
    from tests.server.harness import make_engine

    ae = make_engine(str(tiny_llama), kv_device_bytes="64M", max_model_len=WINDOW, kv_disk_dir=str(tmp_path / "kv"))
    try:
        with memory_server(ae, str(tmp_path / "s.db")) as srv:
            h = {"Authorization": f"Bearer {KEY_A}"}
            sid = httpx.post(f"{srv.url}/v1/sessions", headers=h, json={"system": "Be brief."}).json()["id"]
            for i in range(4):
                g = httpx.post(f"{srv.url}/v1/sessions/{sid}/generate", headers=h, timeout=60, json={
                    "messages": [{"role": "user", "content": f"q{i} " + FILLER * 2}], "max_tokens": 12,
                    "temperature": 0})
                assert g.status_code == 200, g.text
            res = httpx.post(f"{srv.url}/v1/sessions/{sid}/compact", headers=h, timeout=120,
                             json={"keep_recent_tokens": 30, "summary_max_tokens": 24}).json()
            assert res["tokens_after"] < res["tokens_before"]
            assert res["prefill"]["tokens"] == res["tokens_after"]
            full = (res["tokens_after"] // 16) * 16
            loc = httpx.get(f"{srv.url}/v1/sessions/{sid}?locate=true", headers=h).json()["kv_location"]
            assert loc.get("device", 0) >= full, loc  # computed once, in the device prefix cache
            keys = srv.state.store.get_session(sid, owner=hash_api_key(KEY_A)).block_keys
            assert len(keys) == full // 16

            def on_disk(e):
                disk = e.offload.stack.tiers[e.offload.tier_names.index("disk")]
                return sum(disk.contains(k) for k in keys)

            deadline, n = time.time() + 20, 0
            while time.time() < deadline:  # written behind the prefill by the mover
                n = srv.engine_call(on_disk)
                if n == len(keys):
                    break
                time.sleep(0.2)
            assert n == len(keys)
    finally:
        ae.shutdown()


def _long_job(compaction):
    task = {"id": "long", "system": "You are a patient assistant.", "user": "start " + FILLER * 3,
            "followups": [f"next {i} " + FILLER * 3 for i in range(10)], "max_steps": 30, "max_tokens": 24,
            "max_total_tokens": 2000, "tools": [], "sampling": {"temperature": 0}}
    if compaction is not None:
        task["compaction"] = compaction
    return {"tasks": [task]}


def test_agent_job_compacts_instead_of_ending_at_context_length(short_engine, tmp_path):
    from kvstrata.jobs import JobManager
    from kvstrata.sessions import open_store

    async def run(job, store):
        mgr = JobManager(short_engine, store)
        jid = await mgr.create(job)
        await mgr.run(jid)
        return (await mgr.results(jid))[0]

    store = open_store(tmp_path / "jobs.db")
    try:
        off = asyncio.run(run(_long_job(False), store))
        assert off["finish_reason"] == "context_length"  # today's behaviour, kept behind `compaction: false`
        on = asyncio.run(run(_long_job({"keep_recent_tokens": 60, "summary_max_tokens": 32}), store))
    finally:
        store.close()
    assert on["status"] == "done" and on["finish_reason"] == "answered", on["finish_reason"]
    assert on["compactions"] >= 1
    msgs = on["transcript"]
    assert sum(m["role"] == "user" for m in msgs) == 11  # every user turn is in the log
    # each step right after a compaction found the compacted prefix cached (computed once by the warm-up)
    for i, m in enumerate(msgs):
        if m["role"] != "compaction":
            continue
        nxt = next(x for x in msgs[i + 1:] if x["role"] == "assistant")
        k = nxt["kvstrata"]
        assert k["history_tokens_kept"] == m["kvstrata"]["tokens_after"]
        assert k["cached_prompt_tokens"] >= (m["kvstrata"]["tokens_after"] // 16) * 16
        assert k["prompt_tokens"] <= WINDOW


@pytest.mark.parametrize("bad", [{"threshold": 0}, {"nope": 1}, "yes"])
def test_bad_compaction_key_is_a_clear_error(bad):
    from kvstrata.core import KvstrataError
    from kvstrata.jobs.spec import JobSpec

    with pytest.raises(KvstrataError, match="compaction"):
        JobSpec.parse({"tasks": [{"user": "hi", "compaction": bad}]})


def test_default_sizes_fit_what_the_tools_leave_of_the_window():
    """Unset summary / recent sizes shrink so the compacted context (fixed part, summary, recent turns)
    takes at most half of the room the system prompt and tools leave below the threshold; before, a
    session whose tools filled most of a small window could never compact (the job ended at
    context_length). Sizes given explicitly are kept; a fixed part that leaves no room is a clear error."""
    from kvstrata.memory.compaction import CompactionError, CompactionPolicy, fit_policy

    roomy = fit_policy(CompactionPolicy(threshold_tokens=7680), 8192, 300)  # the 8k defaults, unchanged
    assert (roomy.summary_max_tokens, roomy.keep_recent_tokens) == (384, 1024)
    tight = fit_policy(CompactionPolicy(threshold_tokens=3584), 4096, 2918)  # 18 BFCL tools in a 4k window
    room = 3584 - 2918
    assert 16 <= tight.summary_max_tokens <= room // 4 and tight.keep_recent_tokens > 0
    assert tight.summary_max_tokens + tight.keep_recent_tokens <= room // 2
    given = fit_policy(CompactionPolicy(threshold_tokens=3584, keep_recent_tokens=900, summary_max_tokens=300), 4096, 2918)
    assert (given.summary_max_tokens, given.keep_recent_tokens) == (300, 900)
    with pytest.raises(CompactionError, match="tool definitions take 3560"):
        fit_policy(CompactionPolicy(threshold_tokens=3584), 4096, 3560)
