"""The cache simulation behind benchmarks/mooncake_sim.py, on hand-made traces with known answers."""

from __future__ import annotations

from benchmarks.mooncake_sim import LRU, ideal_hit_rate, simulate

B = 512


def test_lru_evicts_oldest_unpinned():
    lru = LRU(2)
    assert lru.insert(1) == [] and lru.insert(2) == []
    lru.touch(1)
    assert lru.insert(3) == [2]
    assert lru.insert(4, pinned={1, 3, 4}) == [4]  # everything else pinned: the newcomer is the victim
    assert 1 in lru and 3 in lru and 4 not in lru


def test_prefix_stops_at_first_missing_block():
    trace = [([1, 2, 3], 3 * B), ([1, 9, 3], 3 * B)]  # block 3 after a miss cannot be reused
    assert ideal_hit_rate(trace) == B / (6 * B)
    r = simulate(trace, "x", device=10, tiers=[], policy="write-on-evict")
    assert r.hit_tokens == {"device": B}


def test_partial_last_block_counts_its_own_tokens():
    trace = [([1, 2], B + 100), ([1, 2], B + 100)]
    assert ideal_hit_rate(trace) == 0.5
    assert simulate(trace, "x", 4, [], "write-on-evict").hit_tokens == {"device": B + 100}


def test_write_on_evict_device_victims_hit_in_host_then_disk():
    # device holds 2 blocks, host 2, disk 8; request sizes force evictions down the stack
    trace = [([1, 2], 2 * B), ([3, 4], 2 * B), ([5, 6], 2 * B), ([1, 2], 2 * B), ([3, 4], 2 * B)]
    r = simulate(trace, "x", 2, [2, 8], "write-on-evict")
    # device victims go to host, host victims to disk: by the time 1,2 and then 3,4 are asked for
    # again, later blocks have pushed each of them through host down to disk
    assert r.hit_tokens == {"disk": 4 * B}
    assert r.total_rate == ideal_hit_rate(trace)


def test_capacity_beyond_unique_blocks_reaches_the_ideal():
    import random

    rng = random.Random(0)
    trace = []
    for _ in range(200):
        prefix = rng.randrange(5)
        ids = [prefix * 100 + j for j in range(rng.randrange(1, 6))] + [rng.randrange(1000, 1100)]
        trace.append((ids, len(ids) * B - rng.randrange(B)))
    unique = len({h for ids, _ in trace for h in ids})
    for policy in ("write-on-evict", "write-through"):
        r = simulate(trace, "x", 8, [16, unique], policy)
        assert abs(r.total_rate - ideal_hit_rate(trace)) < 1e-12
        small = simulate(trace, "x", 8, [16, 16], policy)
        assert small.total_rate < r.total_rate
