"""Per-key quotas over HTTP, honest parking, live tool streams (issue 19: admission and defect 8)."""

from __future__ import annotations

import threading
import time

import httpx

from kvstrata.server.limits import ServerLimits
from tests.server.harness import make_engine, serve
from tests.server.test_errors import assert_openai_error

LONG = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 600,
        "ignore_eos": True, "temperature": 0}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_one_key_cannot_take_everyones_room(tiny_engine, tmp_path):
    """A key at its concurrency quota queues its next request; past its queue quota it gets 429
    quota_exceeded; another key is admitted meanwhile. (The engine thread is held still meanwhile, so
    nothing finishes before the test has looked.)"""
    from kvstrata.sessions import open_store

    store = open_store(tmp_path / "s.db")
    limits = ServerLimits(max_concurrent_per_key=1, max_queued_per_key=1)
    a, b = {"Authorization": "Bearer k-a"}, {"Authorization": "Bearer k-b"}
    short = {**LONG, "max_tokens": 2}
    with serve(tiny_engine, store, api_keys=["k-a", "k-b"], limits=limits) as srv:
        gate = srv.state.admission
        go = threading.Event()
        held = srv.state.aengine.call(lambda e: go.wait(60))  # the engine takes no new work until `go`
        results: dict = {}

        def post(name, headers):
            results[name] = httpx.post(srv.url + "/v1/chat/completions", json=short, headers=headers, timeout=120)

        def until(cond):
            deadline = time.time() + 30
            while not cond() and time.time() < deadline:
                time.sleep(0.01)
            assert cond()

        threads = [threading.Thread(target=post, args=("a1", a))]
        threads[0].start()
        until(lambda: sum(gate.by_key.values()) == 1)  # admitted: A's one slot
        threads.append(threading.Thread(target=post, args=("a2", a)))
        threads[1].start()
        until(lambda: sum(gate.queued_by_key.values()) == 1)  # waits for A's slot
        r = httpx.post(srv.url + "/v1/chat/completions", json=short, headers=a)
        assert_openai_error(r, 429, "quota_exceeded")
        assert r.headers["retry-after"] == "1"
        threads.append(threading.Thread(target=post, args=("b1", b)))
        threads[2].start()
        until(lambda: len(gate.by_key) == 2)  # B is admitted beside A
        go.set()
        held.result(30)
        for t in threads:
            t.join(60)
        assert {k: r.status_code for k, r in results.items()} == {"a1": 200, "a2": 200, "b1": 200}
        assert gate.total == 0 and gate.by_key == {} and gate.queued_by_key == {}
        metrics = httpx.get(srv.url + "/metrics", headers=a).text
        assert 'kvstrata_admission{what="rejected_quota"} 1.0' in metrics
        assert 'kvstrata_admission{what="interactive"} 0.0' in metrics
    store.close()


def test_parking_on_an_unwritable_disk_reports_it_and_does_not_park(tiny_llama, tmp_path):
    from kvstrata.sessions import open_store

    ae = make_engine(str(tiny_llama), kv_device_bytes="32M", kv_disk_dir=str(tmp_path / "kv"))
    store = open_store(tmp_path / "s.db")
    try:
        with serve(ae, store) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            sid = c.post("/v1/sessions", json={}).json()["id"]
            r = c.post(f"/v1/sessions/{sid}/generate", json={"messages": [{"role": "user", "content": "hello " * 40}],
                                                            "max_tokens": 8})
            assert r.status_code == 200
            (tmp_path / "kv").rename(tmp_path / "kv-away")
            (tmp_path / "kv").write_text("not a directory")  # nothing can be written under it now
            # a second turn: its new blocks cannot be written behind, so the park has blocks to write
            r = c.post(f"/v1/sessions/{sid}/generate", json={"messages": [{"role": "user", "content": "more " * 40}],
                                                            "max_tokens": 8})
            assert r.status_code == 200, r.text
            r = c.post(f"/v1/sessions/{sid}/park", json={"tier": "disk", "lease_s": 60})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["kv"]["moved"] is False and body["kv"]["failed"] >= 1 and "not parked" in body["kv"]["reason"]
            assert body["state"] == "active" and body["parked_tier"] is None and body["lease_expires_at"] is None
            s = c.get(f"/v1/sessions/{sid}").json()
            assert s["state"] == "active" and s["parked_tier"] is None
            disk = ae.engine.offload.stack.tiers[0]
            assert disk.stats().pinned == 0  # what a partial write pinned is unpinned
            (tmp_path / "kv").unlink()
            (tmp_path / "kv-away").rename(tmp_path / "kv")
            ok = c.post(f"/v1/sessions/{sid}/park", json={"tier": "disk"}).json()
            assert ok["kv"]["moved"] is True and ok["state"] == "parked" and ok["parked_tier"] == "disk"
    finally:
        ae.shutdown()
        store.close()


def test_a_tool_stream_is_never_silent_for_a_second(tiny_server, slow_steps, monkeypatch):
    """A stream with tools (once held back whole until the reply was complete, so clients timed out under
    load) sends text as it is generated, and a keep-alive comment whenever nothing else went out."""
    monkeypatch.setattr("kvstrata.server.common.KEEPALIVE_S", 0.1)
    body = {**LONG, "max_tokens": 300, "stream": True, "tools": TOOLS, "tool_choice": "auto"}  # tools: a longer prompt
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append((time.perf_counter() - t0, line))
    kinds = ["keepalive" if ln.startswith(":") else ("done" if ln == "data: [DONE]" else "data") for _, ln in lines]
    assert kinds[0] == "data" and kinds[-1] == "done"  # the role chunk first, at once
    assert kinds.count("data") > 5, kinds  # the reply streams as generated, not in one piece at the end
    gaps = [b[0] - a[0] for a, b in zip(lines, lines[1:])]
    assert max(gaps) < 1.0, gaps  # never a second of silence
