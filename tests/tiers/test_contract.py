"""The Tier contract, run against host, disk and remote (a real Redis) tiers alike."""

from __future__ import annotations

import pytest

from tests.tiers.blocks import BLOB_BYTES, make_block


def test_put_get_round_trip_and_miss(any_tier):
    b = make_block(1)
    assert any_tier.get(b.key) is None
    assert not any_tier.contains(b.key)
    assert any_tier.put(b.key, b.blob())
    assert any_tier.contains(b.key)
    assert bytes(any_tier.get(b.key)) == b.blob()
    assert any_tier.get(make_block(2).key) is None


def test_remove_and_keys(any_tier):
    blocks = [make_block(i) for i in range(4)]
    for b in blocks:
        assert any_tier.put(b.key, b.blob())
    assert set(any_tier.keys()) == {b.key for b in blocks}
    any_tier.remove(blocks[0].key)
    any_tier.remove(blocks[0].key)  # absent: a no-op
    assert any_tier.get(blocks[0].key) is None
    assert set(any_tier.keys()) == {b.key for b in blocks[1:]}
    assert any_tier.clear() == 3
    assert list(any_tier.keys()) == []


def test_pin_counts_and_absent(any_tier):
    b = make_block(3)
    assert not any_tier.pin(b.key)  # absent
    any_tier.put(b.key, b.blob())
    assert any_tier.pin(b.key) and any_tier.pin(b.key)
    assert any_tier.stats().pinned == 1
    any_tier.unpin(b.key)
    assert any_tier.stats().pinned == 1  # one pin left
    any_tier.unpin(b.key)
    any_tier.unpin(b.key)  # not pinned: a no-op
    assert any_tier.stats().pinned == 0


def test_batched_forms(any_tier):
    blocks = [make_block(i) for i in range(5)]
    assert any_tier.put_many([(b.key, b.blob()) for b in blocks[:3]]) == [True] * 3
    assert any_tier.contains_many([b.key for b in blocks]) == [True, True, True, False, False]
    got = any_tier.get_many([b.key for b in blocks])
    assert [None if g is None else bytes(g) for g in got] == [b.blob() for b in blocks[:3]] + [None, None]


def test_non_blocking_forms(any_tier):
    b, c = make_block(7), make_block(8)
    assert any_tier.put_async(b.key, b.blob()).result(timeout=10)
    assert bytes(any_tier.get_async(b.key).result(timeout=10)) == b.blob()
    assert any_tier.get_async(c.key).result(timeout=10) is None
    assert any_tier.put_many_async([(c.key, c.blob())]).result(timeout=10) == [True]
    assert [bytes(x) for x in any_tier.get_many_async([b.key, c.key]).result(timeout=10)] == [b.blob(), c.blob()]


def test_stats_count_hits_misses_and_bytes(any_tier):
    b = make_block(9)
    any_tier.put(b.key, b.blob())
    any_tier.get(b.key)
    any_tier.get(b.key)
    any_tier.get(make_block(10).key)
    s = any_tier.stats()
    assert (s.hits, s.misses, s.puts) == (2, 1, 1)
    assert s.bytes_read == 2 * BLOB_BYTES and s.bytes_written == BLOB_BYTES
    assert s.hit_rate == pytest.approx(2 / 3)
    assert s.errors == 0
    if s.blocks is not None:  # the remote tier cannot tell cheaply
        assert (s.blocks, s.bytes) == (1, BLOB_BYTES)


def test_budget_evicts_lru_first(budget_tier):
    blocks = [make_block(i) for i in range(5)]
    for b in blocks[:3]:
        assert budget_tier.put(b.key, b.blob())
    budget_tier.get(blocks[0].key)  # 0 is now the most recently used; 1 is the LRU
    assert budget_tier.put(blocks[3].key, blocks[3].blob())
    assert set(budget_tier.keys()) == {blocks[0].key, blocks[2].key, blocks[3].key}
    s = budget_tier.stats()
    assert s.bytes <= s.capacity_bytes and s.evictions == 1


def test_budget_never_evicts_pinned(budget_tier):
    blocks = [make_block(i) for i in range(5)]
    for b in blocks[:3]:
        budget_tier.put(b.key, b.blob())
    for b in blocks[:2]:
        assert budget_tier.pin(b.key)
    assert budget_tier.put(blocks[3].key, blocks[3].blob())  # evicts 2, the only unpinned one
    assert budget_tier.contains(blocks[0].key) and budget_tier.contains(blocks[1].key)
    assert not budget_tier.contains(blocks[2].key)
    budget_tier.pin(blocks[3].key)
    assert not budget_tier.put(blocks[4].key, blocks[4].blob())  # everything pinned: no room
    assert budget_tier.stats().put_failures == 1
    assert not budget_tier.contains(blocks[4].key)
    budget_tier.unpin(blocks[0].key)
    assert budget_tier.put(blocks[4].key, blocks[4].blob())
    assert not budget_tier.contains(blocks[0].key)


def test_blob_larger_than_budget_fails(budget_tier):
    assert not budget_tier.put(make_block(0).key, b"x" * (4 * BLOB_BYTES))
    assert budget_tier.stats().blocks == 0


def test_evict_listener_receives_victims(budget_tier):
    got = []
    budget_tier.set_evict_listener(lambda k, blob: got.append((k, bytes(blob))))
    blocks = [make_block(i) for i in range(4)]
    for b in blocks:
        budget_tier.put(b.key, b.blob())
    assert got == [(blocks[0].key, blocks[0].blob())]
