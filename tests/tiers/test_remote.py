"""Remote tier on a real redis-server: outages degrade to misses, recovery, TTL and pins, namespaces."""

from __future__ import annotations

import time

import pytest
import redis

from kvstrata.core import KvstrataError
from kvstrata.tiers.remote import RedisTier
from tests.support.redis_server import free_port
from tests.tiers.blocks import BLOB_BYTES, make_block


def wait_until(fn, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.02)
    return False


def test_redis_stopped_mid_run_gives_misses_then_recovers(own_redis):
    t = RedisTier(own_redis.url, backoff_initial_s=0.05, backoff_max_s=0.4)
    a, b = make_block(1), make_block(2)
    assert t.put(a.key, a.blob()) and bytes(t.get(a.key)) == a.blob()

    own_redis.stop()
    assert t.get(a.key) is None  # no exception reaches the caller
    assert t.put(b.key, b.blob()) is False
    assert t.contains(a.key) is False
    assert t.contains_many([a.key, b.key]) == [False, False]
    assert t.get_many([a.key, b.key]) == [None, None]
    assert not t.pin(a.key)
    t.remove(a.key)
    assert list(t.keys()) == []
    s = t.stats()
    assert s.errors >= 1 and s.put_failures >= 1 and s.misses >= 3

    own_redis.start()  # same port, empty (no persistence)
    assert wait_until(lambda: t.put(b.key, b.blob())), "puts never worked again after the restart"
    assert bytes(t.get(b.key)) == b.blob()
    assert t.get(a.key) is None
    t.close()


def test_backoff_answers_at_once_without_touching_the_network(own_redis):
    t = RedisTier(own_redis.url, backoff_initial_s=60)
    a = make_block(1)
    own_redis.stop()
    assert t.get(a.key) is None
    errors = t.stats().errors
    assert errors == 1 and not t.available
    for _ in range(20):
        assert t.get(a.key) is None and not t.put(a.key, a.blob())
    assert t.stats().errors == errors  # no new connection attempts while backing off
    own_redis.start()
    assert t.ping() and t.available  # an explicit ping ends the backoff
    assert t.put(a.key, a.blob())
    t.close()


def test_server_that_never_existed_is_a_miss():
    t = RedisTier(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    a = make_block(1)
    assert t.get(a.key) is None and t.put(a.key, a.blob()) is False and not t.ping()
    t.close()


def test_bad_url_is_a_user_error():
    with pytest.raises(KvstrataError, match="Redis URL"):
        RedisTier("http://nowhere")


def test_ttl_is_set_refreshed_and_lifted_by_pins(redis_server):
    t = RedisTier(redis_server.url, prefix="ttl-test:", ttl_s=100)
    r = redis.Redis.from_url(redis_server.url)
    a = make_block(1)
    t.put(a.key, a.blob())
    assert 0 < r.ttl(t.rkey(a.key)) <= 100
    r.expire(t.rkey(a.key), 50)
    t.get(a.key)  # a hit refreshes the TTL
    assert r.ttl(t.rkey(a.key)) > 50
    assert t.pin(a.key) and t.pin(a.key)
    assert r.ttl(t.rkey(a.key)) == -1  # pinned: never expires
    t.unpin(a.key)
    assert r.ttl(t.rkey(a.key)) == -1
    t.unpin(a.key)
    assert 0 < r.ttl(t.rkey(a.key)) <= 100
    t.clear()
    t.close()


def test_short_ttl_expires(redis_server):
    t = RedisTier(redis_server.url, prefix="ttl-short:", ttl_s=1)
    a = make_block(1)
    t.put(a.key, a.blob())
    assert wait_until(lambda: not t.contains(a.key), timeout_s=5)  # (a get would refresh the TTL)
    assert t.get(a.key) is None
    t.close()


def test_prefixes_separate_namespaces(redis_server):
    one = RedisTier(redis_server.url, prefix="engine-a:")
    two = RedisTier(redis_server.url, prefix="engine-b:")
    a, b = make_block(1), make_block(2)
    one.put(a.key, a.blob())
    two.put(b.key, b.blob())
    redis.Redis.from_url(redis_server.url).set("engine-a:not-a-block", b"x")
    assert one.get(b.key) is None and two.get(a.key) is None
    assert list(one.keys()) == [a.key] and list(two.keys()) == [b.key]
    assert one.scan_usage() == (1, BLOB_BYTES)
    assert one.clear() == 1
    assert two.get(b.key) is not None
    two.clear()
    one.close()
    two.close()


def test_glob_characters_in_prefix_are_literal(redis_server):
    star = RedisTier(redis_server.url, prefix="x*:")
    other = RedisTier(redis_server.url, prefix="xy:")
    a = make_block(1)
    other.put(a.key, a.blob())
    assert list(star.keys()) == []
    other.clear()
