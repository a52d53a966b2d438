"""`kvstrata serve` as a real process: SIGKILL + restart keeps sessions; SIGTERM finishes in-flight work."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.harness import ServerProcess


def server_args(model, tmp) -> list[str]:
    return ["--model", str(model), "--kv-device-bytes", "16M", "--session-store", str(tmp / "sessions.db"),
            "--kv-disk-dir", str(tmp / "kv"), "--max-waiting", "64", "--served-model-name", "tiny"]


def post(url: str, body: dict) -> dict:
    r = httpx.post(url, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def killed_and_restarted(tiny_llama, tmp_path_factory):
    """A session with two turns in server A; A is SIGKILLed; server B starts on the same store and disk."""
    tmp = tmp_path_factory.mktemp("sigkill")
    a = ServerProcess(server_args(tiny_llama, tmp), tmp / "a.log").wait_ready()
    try:
        sid = post(a.url + "/v1/sessions", {"system": "You are a test."})["id"]
        for text in ("The quick brown fox jumps over the lazy dog.", "Once upon a time there was a little engine."):
            post(a.url + f"/v1/sessions/{sid}/generate",
                 {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0})
        before = httpx.get(a.url + f"/v1/sessions/{sid}", params={"include_tokens": True}).json()
        # wait until the write-through copies of every computed full block (the last sampled token's
        # KV never is computed) are files of the disk tier
        deadline = time.time() + 20
        while len(list((tmp / "kv").rglob("*.kvb"))) < (before["num_tokens"] - 1) // 16 and time.time() < deadline:
            time.sleep(0.1)
    finally:
        a.kill(signal.SIGKILL)
        a.close()
    assert a.proc.returncode == -signal.SIGKILL
    b = ServerProcess(server_args(tiny_llama, tmp), tmp / "b.log").wait_ready()
    after = httpx.get(b.url + f"/v1/sessions/{sid}", params={"include_tokens": True}).json()
    turn = post(b.url + f"/v1/sessions/{sid}/generate",  # the first turn after the restart
                {"messages": [{"role": "user", "content": "And then?"}], "max_tokens": 4, "temperature": 0})
    yield before, after, turn
    b.close()


def test_sigkill_restart_keeps_session(killed_and_restarted):
    before, after, turn = killed_and_restarted
    assert after["messages"] == before["messages"] and len(after["messages"]) == 4
    assert after["token_ids"] == before["token_ids"] and after["version"] == before["version"]
    assert turn["session"]["num_messages"] == 6
    assert turn["usage"]["prompt_tokens"] > before["num_tokens"]


def test_sigkill_restart_next_turn_loads_prefix_from_disk(killed_and_restarted):
    before, after, turn = killed_and_restarted
    by_tier = turn["usage"]["prompt_tokens_details"]["cached_tokens_by_tier"]
    assert by_tier.get("disk", 0) >= ((before["num_tokens"] - 1) // 16) * 16, by_tier


def test_sigterm_finishes_in_flight_stream(tiny_llama, tmp_path):
    srv = ServerProcess(server_args(tiny_llama, tmp_path), tmp_path / "s.log").wait_ready()
    try:
        sid = post(srv.url + "/v1/sessions", {})["id"]
        post(srv.url + f"/v1/sessions/{sid}/generate", {"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 4})
        events: list[str] = []
        started = threading.Event()

        def stream():
            body = {"model": "tiny", "messages": [{"role": "user", "content": "story"}], "max_tokens": 300,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
                events.append(f"status {r.status_code}")
                started.set()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60), srv.output()
        assert events[0] == "status 200", events
        while len(events) < 3:
            time.sleep(0.01)
        srv.kill(signal.SIGTERM)
        t.join(120)
        # uvicorn re-raises the signal once its graceful shutdown is done
        assert srv.proc.wait(60) in (0, -signal.SIGTERM), srv.output()
        assert "Application shutdown complete" in srv.output()
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[1:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 300  # every token was generated and sent
    finally:
        srv.close()
    from kvstrata.sessions import open_store

    with open_store(tmp_path / "sessions.db") as store:
        from kvstrata.sessions import ANY_OWNER

        s = store.get_session_info(sid, owner=ANY_OWNER)
        # sessions served by the process were parked at the disk tier on the way out
        assert s.state.value == "parked" and s.parked_tier == "disk"
