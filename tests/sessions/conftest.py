"""Fixtures for the session store tests: every store test runs against SQLite and a real PostgreSQL.

The PostgreSQL server (tests/support/postgres_server.py) starts once per test session on a free
127.0.0.1 port; each test gets a fresh database in it. If the server cannot start, the tests that
need it fail with the server's log: they never skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so `tests.support` imports however pytest was started
    sys.path.insert(0, str(ROOT))

from kvstrata.sessions import open_store  # noqa: E402



@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def _run_child(script: str, *args: str, **kw) -> subprocess.Popen:
    """Start tests/sessions/<script> in a fresh interpreter with the project's src on its path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / script), *args],
        env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )  # fmt: skip


@pytest.fixture
def run_child():
    """`run_child(script, *args)`: a child interpreter (stdout/stderr piped, text mode)."""
    procs: list[subprocess.Popen] = []

    def start(script: str, *args: str, **kw) -> subprocess.Popen:
        p = _run_child(script, *args, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:  # only the children this test started
        if p.poll() is None:
            p.kill()
        p.wait()
