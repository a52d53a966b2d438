"""Recall over embeddings: facts planted early in a long conversation, asked about after it was compacted,
come back in the top 5 of memory_search for >= 90% of them; another API key never sees them; the
built-in memory_search tool answers inside a session turn; a server killed mid-embedding loses nothing
and its index catches up on restart. Real embedding model (the packaged all-MiniLM-L6-v2), tiny LLM."""

from __future__ import annotations

import json
import random
import sqlite3
import time

import httpx
import pytest

from benchmarks.memory_embed import FACTS as EMBED_FACTS
from tests.memory.conftest import KEY_A, KEY_B, memory_server
from tests.server.harness import ServerProcess

FACTS = EMBED_FACTS[:10]  # (planted early, asked later in other words): the embedding benchmark's first ten


def filler(rng: random.Random, n: int) -> list[str]:
    """Tool-result-like and chatty filler on other topics (file listings, quotes, weather, arithmetic)."""
    out = []
    for i in range(n):
        k = rng.randrange(5)
        if k == 0:
            out.append(json.dumps({"files": [f"report_{rng.randrange(99)}.txt", f"data_{i}.csv", "notes.md"],
                                   "cwd": f"/home/user/workspace/{i}"}))
        elif k == 1:
            out.append(f"Stock {rng.choice(['ACME', 'GLOBEX', 'INITECH'])} closed at {rng.uniform(10, 500):.2f} "
                       f"with volume {rng.randrange(10**5, 10**7)}.")
        elif k == 2:
            out.append(f"Weather for day {i}: {rng.choice(['rain', 'sun', 'fog', 'snow'])}, "
                       f"{rng.randrange(-5, 30)} degrees, wind {rng.randrange(0, 40)} km/h.")
        elif k == 3:
            a, b = rng.randrange(1000), rng.randrange(1000)
            out.append(f"The calculator returned {a} * {b} = {a * b}.")
        else:
            out.append(f"Ticket #{rng.randrange(10000)} was updated: status {rng.choice(['open', 'closed'])}, "
                       f"assignee {rng.choice(['sam', 'lee', 'kim'])}, priority {rng.randrange(1, 5)}.")
    return out


def _h(key):
    return {"Authorization": f"Bearer {key}"}


def _add(srv, key, cid, texts, role="user"):
    for i in range(0, len(texts), 20):
        r = httpx.post(f"{srv.url}/v1/conversations/{cid}/items", headers=_h(key), timeout=60,
                       json={"items": [{"type": "message", "role": role, "content": t} for t in texts[i:i + 20]]})
        assert r.status_code == 200, r.text


def _search(srv, key, query, **kw):
    r = httpx.post(f"{srv.url}/v1/memory/search", headers=_h(key), json={"query": query, "k": 5, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_planted_facts_are_recalled_after_compaction_and_never_cross_keys(short_engine, embedder, tmp_path):
    rng = random.Random(7)
    with memory_server(short_engine, str(tmp_path / "s.db"), embedder=embedder) as srv:
        a, b = srv.client(KEY_A), srv.client(KEY_B)
        conv = a.conversations.create()
        early = []
        for fact, _ in FACTS:  # planted early, each among filler
            early += [fact] + filler(rng, 2)
        _add(srv, KEY_A, conv.id, early)
        _add(srv, KEY_A, conv.id, filler(rng, 80), role="assistant")
        _add(srv, KEY_A, conv.id, filler(rng, 20))
        # the other key has its own conversation (so its searches have something to find)
        other = b.conversations.create()
        _add(srv, KEY_B, other.id, filler(rng, 15))
        # compact: the early turns leave the context (the log keeps them)
        c = httpx.post(f"{srv.url}/v1/sessions/{conv.id}/compact", headers=_h(KEY_A), timeout=120,
                       json={"keep_recent_tokens": 40, "summary_max_tokens": 16})
        assert c.status_code == 200, c.text
        assert c.json()["kept_from"] > len(early)
        assert srv.state.memory.recall.wait_idle(120)

        found = 0
        for fact, question in FACTS:
            hits = _search(srv, KEY_A, question, session_id=conv.id)
            found += any(h["text"] == fact for h in hits)
            assert all(h["session_id"] == conv.id for h in hits)
        assert found >= 0.9 * len(FACTS), f"only {found} of {len(FACTS)} planted facts in the top 5"
        # owner-wide search by A finds them too; B's searches never return A's text
        assert any(h["text"] == FACTS[0][0] for h in _search(srv, KEY_A, FACTS[0][1]))
        planted = {f for f, _ in FACTS}
        for _, question in FACTS:
            hits = _search(srv, KEY_B, question)
            assert hits and all(h["session_id"] == other.id and h["text"] not in planted for h in hits)
        r = httpx.post(f"{srv.url}/v1/memory/search", headers=_h(KEY_B),
                       json={"query": FACTS[0][1], "session_id": conv.id})
        assert r.status_code == 404
        # after the conversation is deleted its memory is gone with it
        a.conversations.delete(conv.id)
        assert all(h["session_id"] != conv.id for h in _search(srv, KEY_A, FACTS[0][1]))


@pytest.fixture(scope="module")
def window_4k_engine(tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint
    from tests.server.harness import make_engine

    # the tool's definition alone is ~900 tokens of the tiny tokenizer: a longer window than tiny_llama's
    ck = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-4k"), "llama", max_position_embeddings=4096)
    ae = make_engine(str(ck), kv_device_bytes="64M")
    yield ae
    ae.shutdown()


def test_memory_search_tool_runs_inside_a_session_turn(window_4k_engine, embedder, tmp_path):
    with memory_server(window_4k_engine, str(tmp_path / "s.db"), embedder=embedder) as srv:
        h = _h(KEY_A)
        s = httpx.post(f"{srv.url}/v1/sessions", headers=h, json={
            "tools": [{"type": "memory_search"}],
            "messages": [{"role": "user", "content": FACTS[1][0]}, {"role": "assistant", "content": "Noted."}]}).json()
        assert s["tools"][0]["function"]["name"] == "memory_search"
        assert srv.state.memory.recall.wait_idle(60)
        g = httpx.post(f"{srv.url}/v1/sessions/{s['id']}/generate", headers=h, timeout=120, json={
            "messages": [{"role": "user", "content": FACTS[1][1]}], "max_tokens": 400, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "memory_search"}}})
        assert g.status_code == 200, g.text
        msgs = httpx.get(f"{srv.url}/v1/sessions/{s['id']}", headers=h).json()["messages"]
        tool = [m for m in msgs if m["role"] == "tool"]
        assert tool and tool[0]["name"] == "memory_search", (g.json(), msgs)  # the server ran it and went on
        assert msgs[-1]["role"] == "assistant"
        results = json.loads(tool[0]["content"]) if not tool[0]["content"].startswith("Error") else None
        assert results is None or all(isinstance(x["text"], str) for x in results)


@pytest.mark.slow
def test_kill_mid_embedding_loses_nothing(tiny_llama, tmp_path):
    db = tmp_path / "s.db"
    args = ["--model", str(tiny_llama), "--kv-device-bytes", "32M", "--session-store", str(db), "--api-key", KEY_A]
    rng = random.Random(3)
    texts = [" ".join(filler(rng, 12)) for _ in range(160)]  # ~1,500 characters each: 2-3 chunks
    marker = "The launch code word for the orbital test is periwinkle zebra."
    texts[77] = marker + " " + texts[77]
    srv = ServerProcess(args, tmp_path / "serve1.log").wait_ready()
    try:
        ids = []
        for j in range(4):
            cid = httpx.post(f"{srv.url}/v1/conversations", headers=_h(KEY_A), json={}).json()["id"]
            ids.append(cid)
            _add(srv, KEY_A, cid, texts[j * 40:(j + 1) * 40])
        deadline, st = time.time() + 120, {}
        while time.time() < deadline:
            st = httpx.get(f"{srv.url}/v1/memory/stats", headers=_h(KEY_A)).json()["recall"]
            if st["items"] >= 10:
                break
            time.sleep(0.05)
        assert st["items"] >= 10 and st["sessions_behind"] > 0, st  # killed in the middle of the backlog
        srv.kill()
        srv.proc.wait(30)
    finally:
        srv.close()
    srv = ServerProcess(args, tmp_path / "serve2.log").wait_ready()
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            st = httpx.get(f"{srv.url}/v1/memory/stats", headers=_h(KEY_A)).json()["recall"]
            if st["sessions_behind"] == 0:
                break
            time.sleep(0.5)
        assert st["sessions_behind"] == 0, st
        hits = _search(srv, KEY_A, "What is the launch code word for the orbital test?")
        assert any(h["text"].startswith(marker) and h["session_id"] == ids[1] for h in hits)
    finally:
        srv.close()
    con = sqlite3.connect(db)
    try:
        for cid in ids:
            n = con.execute("SELECT num_messages FROM sessions WHERE id = ?", (cid,)).fetchone()[0]
            idxs = {r[0] for r in con.execute("SELECT DISTINCT idx FROM memory_items WHERE session_id = ?", (cid,))}
            assert idxs == set(range(n)), cid  # every message embedded
            dup = con.execute("SELECT COUNT(*) FROM (SELECT idx, part FROM memory_items WHERE session_id = ? "
                              "GROUP BY idx, part HAVING COUNT(*) > 1)", (cid,)).fetchone()[0]
            assert dup == 0
    finally:
        con.close()


def test_memory_search_in_an_agent_job(window_4k_engine, embedder, tmp_path):
    """A task that names memory_search gets the built-in tool; it searches the task's own session only."""
    import asyncio

    from kvstrata.jobs import JobManager
    from kvstrata.memory import Recall
    from kvstrata.sessions import open_store

    store = open_store(tmp_path / "jobs.db")
    recall = Recall(store, embedder=embedder, poll_s=0.1).start()
    task = {"id": "t", "messages": [{"role": "user", "content": FACTS[3][0]},
                                    {"role": "assistant", "content": "Noted."},
                                    {"role": "user", "content": FACTS[3][1]}],
            "tools": ["memory_search"], "tool_choice": "required", "max_steps": 2, "max_tokens": 300,
            "sampling": {"temperature": 0}}
    other = {"id": "u", "user": FACTS[5][0], "tools": [], "max_steps": 1, "max_tokens": 4}

    async def go():
        mgr = JobManager(window_4k_engine, store, recall=recall)
        jid = await mgr.create({"tasks": [other]})  # another task's session, which must not be searched
        await mgr.run(jid)
        await asyncio.to_thread(recall.wait_idle, 60)
        jid = await mgr.create({"tasks": [task]})
        await mgr.run(jid)
        return (await mgr.results(jid))[0]

    try:
        rec = asyncio.run(go())
    finally:
        recall.stop()
        store.close()
    tools = [m for m in rec["transcript"] if m["role"] == "tool"]
    assert tools and tools[0]["name"] == "memory_search" and not tools[0]["kvstrata"]["error"], tools
    hits = json.loads(tools[0]["content"])
    assert all(h["text"] != FACTS[5][0] for h in hits)  # only this task's session
    # the task's own session may not be embedded yet when the tool runs (never waited on); what it
    # returns comes from that session alone
    # (its own tool-call message may already be embedded: an assistant message after the three given, at an
    # index the other task's two-message session does not have)
    assert all(h["text"] in (FACTS[3][0], "Noted.", FACTS[3][1])
               or (h["role"] == "assistant" and h["message_index"] >= 3) for h in hits), hits
