"""A session store that fails is the server's problem, not the client's (issue 19, defect 7): a full
SQLite database and a PostgreSQL server that stopped answer 503 store_unavailable with Retry-After and
no database name, host or path; /health says so; chat still serves; it all recovers when the store does."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.harness import serve
from tests.server.test_errors import assert_openai_error

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BIG = [{"role": "user", "content": "a fairly long message " * 20_000}]  # needs new database pages


@pytest.fixture(autouse=True)
def _short_health_memory(monkeypatch):
    monkeypatch.setattr("kvstrata.server.health.RECENT_FAILURE_S", 0.5)
    monkeypatch.setattr("kvstrata.server.health.PROBE_EVERY_S", 0.0)


def _unavailable(r: httpx.Response, *secrets: str) -> None:
    assert_openai_error(r, 503, "store_unavailable")
    assert r.headers["retry-after"] == "1"
    for s in secrets:
        assert s not in r.text


def _healthy_again(url: str, timeout: float = 20) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = httpx.get(url + "/health")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.1)
    raise AssertionError(f"/health never recovered: {r.text}")


def test_a_full_sqlite_store_is_503_and_recovers(tiny_engine, tmp_path, caplog):
    """SQLite answers SQLITE_FULL ("database or disk is full") once the file may not grow: what a full
    disk does, made here with PRAGMA max_page_count on every connection the store opens."""
    from kvstrata.sessions import open_store

    store = open_store(tmp_path / "s.db")
    cap = [1 << 30]
    real_conn = store._conn

    def capped_conn():
        c = real_conn()
        c.execute(f"PRAGMA max_page_count = {cap[0]}")
        return c

    store._conn = capped_conn
    with serve(tiny_engine, store) as srv:
        url = srv.url
        sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
        cap[0] = store._conn().execute("PRAGMA page_count").fetchone()[0]  # full from now on
        r = httpx.post(url + "/v1/sessions", json={"messages": BIG})
        _unavailable(r, str(tmp_path), "s.db", "SQLite")
        _unavailable(httpx.post(url + f"/v1/sessions/{sid}/messages", json={"messages": BIG}), str(tmp_path))
        _unavailable(httpx.post(url + "/v1/jobs", json={"tasks": [{"user": "x" * 200_000}]}), str(tmp_path))
        health = httpx.get(url + "/health")
        _unavailable(health, str(tmp_path))
        assert httpx.post(url + "/v1/chat/completions", json=CHAT).status_code == 200
        assert "database or disk is full" in caplog.text  # the operator is told what failed
        cap[0] = 1 << 30  # room again
        assert httpx.post(url + "/v1/sessions", json={"messages": BIG}).status_code == 200
        assert _healthy_again(url)["store"] == "ok"
        assert len(httpx.get(url + "/v1/sessions").json()["data"]) == 2  # the refused ones stored nothing
    store.close()


@pytest.fixture
def pg(tmp_path):
    from tests.support.postgres_server import PostgresServer

    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


def test_postgresql_down_is_503_and_recovers(tiny_engine, pg):
    from kvstrata.sessions import open_store

    store = open_store(pg.create_database(), connect_timeout_s=2)
    with serve(tiny_engine, store) as srv:
        url = srv.url
        sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
        pg.stop()
        secrets = ("127.0.0.1", str(pg.port), "kvstrata@", "postgresql")
        _unavailable(httpx.post(url + "/v1/sessions", json={}), *secrets)
        _unavailable(httpx.get(url + f"/v1/sessions/{sid}"), *secrets)
        _unavailable(httpx.post(url + "/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 2}),
                     *secrets)
        _unavailable(httpx.get(url + "/health"), *secrets)
        assert httpx.post(url + "/v1/chat/completions", json=CHAT).status_code == 200
        pg.start()
        assert _healthy_again(url)["store"] == "ok"
        assert httpx.get(url + f"/v1/sessions/{sid}").status_code == 200
    store.close()
