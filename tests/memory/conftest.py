"""Fixtures of the memory tests: a tiny random-weight engine with a short window (so compaction is cheap
to reach), the packaged embedding model loaded once, stores of both backends (a real PostgreSQL through
tests/support/postgres_server.py), and a served app with recall and API keys."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.server.harness import make_engine, serve  # noqa: E402

KEY_A, KEY_B = "sk-memory-a", "sk-memory-b"
WINDOW = 512  # the tiny engine's max_model_len


@pytest.fixture(scope="package")
def short_engine(tiny_llama):
    ae = make_engine(str(tiny_llama), kv_device_bytes="64M", max_model_len=WINDOW)
    yield ae
    ae.shutdown()


@pytest.fixture(scope="session")
def embedder():
    from kvstrata.memory.embed import Embedder

    e = Embedder()
    e.encode(["warm up"])
    return e


@contextmanager
def memory_server(aengine, store_url: str, embedder=None, keys=(KEY_A, KEY_B), policy=None, **retention):
    """A served app over `store_url` with API keys, recall (when an embedder is given) and retention."""
    from kvstrata.memory import Recall
    from kvstrata.server.memory_api import Retention, configure
    from kvstrata.sessions import open_store

    store = open_store(store_url)
    srv = serve(aengine, store, api_keys=list(keys), lease_sweep_s=0, resume_jobs=False)
    recall = Recall(store, embedder=embedder, poll_s=0.2) if embedder is not None else None
    configure(srv.app, recall=recall, retention=Retention(**retention), policy=policy)
    try:
        with srv:
            yield srv
    finally:
        store.close()


@pytest.fixture
def store(store_url):
    from kvstrata.sessions import open_store

    s = open_store(store_url)
    yield s
    s.close()
