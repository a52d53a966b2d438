"""Fixtures of the server tests: one tiny-model engine and server shared by the package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so `tests.server.harness` imports however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.server.harness import make_engine, serve, slow_engine_steps  # noqa: E402


@pytest.fixture(scope="package")
def tiny_engine(tiny_llama):
    ae = make_engine(str(tiny_llama))
    yield ae
    ae.shutdown()


@pytest.fixture(scope="package")
def tiny_server(tiny_engine, tmp_path_factory):
    from kvstrata.sessions import open_store

    store = open_store(tmp_path_factory.mktemp("store") / "sessions.db")
    with serve(tiny_engine, store) as srv:
        yield srv
    store.close()


@pytest.fixture(scope="package")
def default_server(tmp_path_factory):
    """A server on the default model (SmolLM2-135M), for behaviour that needs real text; one per package."""
    from kvstrata.sessions import open_store

    ae = make_engine("default", kv_device_bytes="256M")
    store = open_store(tmp_path_factory.mktemp("default-store") / "s.db")
    with serve(ae, store, names=("default",)) as srv:
        yield srv
    ae.shutdown()
    store.close()


@pytest.fixture
def client(tiny_server):
    return tiny_server.client()


@pytest.fixture
def slow_steps(tiny_server):
    """Each engine step takes at least 10 ms, so a 900-1,000 token request lasts >= 9 s whatever the
    machine: a test of what happens while a request runs (a disconnect, keep-alives) then cannot pass or
    fail by the tiny model finishing first (CI once decoded all 1,000 tokens inside a 0.5 s client timeout)."""
    undo = slow_engine_steps(tiny_server.state.aengine)
    yield
    undo()
