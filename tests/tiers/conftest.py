"""Fixtures for the tier tests: tiny KV blocks, one tier of each kind, a real Redis server.

Tests that need Redis fail (never skip) when it cannot start: RedisServerError carries the reason.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from kvstrata.tiers.disk import DiskTier
from kvstrata.tiers.host import HostTier
from kvstrata.tiers.remote import RedisTier
from tests.tiers.blocks import BLOB_BYTES


@pytest.fixture
def redis_tier(redis_server):
    t = RedisTier(redis_server.url, prefix=f"test:{uuid.uuid4().hex[:8]}:", backoff_initial_s=0.05)
    yield t
    t.clear()
    t.close()


@pytest.fixture(params=["host", "disk", "remote"])
def any_tier(request, tmp_path):
    """A fresh, empty tier of each kind (the remote one on the session's Redis, own prefix)."""
    if request.param == "host":
        t = HostTier(1 << 20, pin_memory=False)
    elif request.param == "disk":
        t = DiskTier(tmp_path / "kv", 1 << 20)
    else:
        t = request.getfixturevalue("redis_tier")
    yield t
    t.close()


@pytest.fixture(params=["host", "disk"])
def budget_tier(request, tmp_path):
    """A tier with room for exactly 3 test blocks."""
    if request.param == "host":
        return HostTier(3 * BLOB_BYTES, pin_memory=False)
    return DiskTier(tmp_path / "kv", 3 * BLOB_BYTES)


def _try(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory this process cannot write to: chmod for a normal user, a read-only mount for root."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if not _try(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)]):
        raise RuntimeError("running as root and cannot mount a read-only tmpfs; run the tests as a normal user")
    yield d
    _try(["umount", str(d)])
