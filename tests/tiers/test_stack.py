"""TierStack: verified loads with discard-and-fall-through, promotion, write policies, the bounded mover."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from kvstrata.core import KvstrataError
from kvstrata.tiers.disk import DiskTier
from kvstrata.tiers.host import HostTier
from kvstrata.tiers.remote import RedisTier
from kvstrata.tiers.stack import TierStack
from tests.tiers.blocks import BLOB_BYTES, FP, make_block


def host(n_blocks=100):
    return HostTier(n_blocks * BLOB_BYTES, pin_memory=False)


def test_load_verifies_and_promotes_to_faster_tiers(tmp_path):
    h, d = host(), DiskTier(tmp_path)
    stack = TierStack([h, d], FP)
    b = make_block(1)
    d.put(b.key, b.blob())
    assert stack.lookup_prefix([b.key]) == ["disk"]
    y = stack.load(b.key, b.token_ids)
    assert torch.equal(y, b.x)
    assert stack.flush(10)
    assert h.contains(b.key) and stack.lookup_prefix([b.key]) == ["host"]
    assert torch.equal(stack.load(b.key, b.token_ids), b.x)
    s = stack.stats()["tiers"]
    assert (s["disk"]["verified_hits"], s["host"]["verified_hits"]) == (1, 1)
    assert (s["host"]["hits"], s["host"]["misses"]) == (1, 1)
    stack.close()


def test_load_miss_everywhere_is_none(tmp_path):
    stack = TierStack([host(), DiskTier(tmp_path)], FP)
    b = make_block(1)
    assert stack.load(b.key, b.token_ids) is None
    assert stack.stats()["load_misses"] == 1
    stack.close()


def test_lookup_prefix_stops_at_first_missing_block(tmp_path, redis_tier):
    h, d = host(), DiskTier(tmp_path)
    stack = TierStack([h, d, redis_tier], FP)
    blocks = [make_block(i) for i in range(6)]
    h.put(blocks[0].key, blocks[0].blob())
    d.put(blocks[1].key, blocks[1].blob())
    redis_tier.put(blocks[2].key, blocks[2].blob())
    d.put(blocks[3].key, blocks[3].blob())
    redis_tier.put(blocks[3].key, blocks[3].blob())
    # block 4 is nowhere; block 5 is in the host tier but cannot be used without block 4
    h.put(blocks[5].key, blocks[5].blob())
    assert stack.lookup_prefix([b.key for b in blocks]) == ["host", "disk", "remote", "disk"]
    assert stack.lookup_prefix([blocks[4].key, blocks[0].key]) == []
    stack.close(close_tiers=False)


def test_write_on_evict_cascades_victims_down(tmp_path):
    h, d = host(2), DiskTier(tmp_path)
    stack = TierStack([h, d], FP, write_policy="write-on-evict")
    blocks = [make_block(i) for i in range(5)]
    for b in blocks:
        assert stack.offer(b.key, b.token_ids, b.x)
        stack.flush(10)
    assert set(h.keys()) == {blocks[3].key, blocks[4].key}
    assert set(d.keys()) == {b.key for b in blocks[:3]}
    for b in blocks:
        assert torch.equal(stack.load(b.key, b.token_ids), b.x)
        assert stack.flush(10)
    assert not stack.offer_on_compute
    stack.close()


def test_write_through_writes_every_tier_with_its_codec(tmp_path):
    h, d = host(), DiskTier(tmp_path)
    stack = TierStack([h, d], FP, codecs=["raw", "int8"], write_policy="write-through")
    b = make_block(1)
    assert stack.offer(b.key, b.token_ids, b.x) and stack.flush(10)
    assert h.contains(b.key) and d.contains(b.key)
    assert len(d.get(b.key)) < len(h.get(b.key))  # int8 on disk
    h.remove(b.key)
    y = stack.load(b.key, b.token_ids)  # from disk, dequantized
    assert not torch.equal(y, b.x)
    assert torch.allclose(y, b.x, atol=float(b.x.abs().max()) / 127)
    assert stack.offer_on_compute
    stack.close()


def _corrupt_disk_file(d: DiskTier, key: bytes, how: str) -> None:
    p = d.path(key)
    raw = bytearray(p.read_bytes())
    if how == "checksum":
        raw[-7] ^= 0x04
    elif how == "truncated":
        raw = raw[: len(raw) - 100]
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize("reason", ["checksum", "truncated", "fingerprint", "tokens"])
def test_bad_copy_is_discarded_counted_and_next_tier_used(tmp_path, redis_tier, reason):
    d = DiskTier(tmp_path)
    stack = TierStack([d, redis_tier], FP)
    b = make_block(1)
    if reason == "fingerprint":  # another model's block stored under this key
        d.put(b.key, b.blob(fingerprint="0" * 64))
    elif reason == "tokens":  # a block whose token ids are not the ones asked for
        other = make_block(2)
        d.put(b.key, type(b)(b.key, other.token_ids, other.x).blob())
    else:
        d.put(b.key, b.blob())
        _corrupt_disk_file(d, b.key, reason)
    redis_tier.put(b.key, b.blob())

    y = stack.load(b.key, b.token_ids)
    assert torch.equal(y, b.x)  # the good remote copy, never the bad one
    s = stack.stats()["tiers"]
    assert s["disk"]["discards"] == {reason: 1}
    assert s["remote"]["verified_hits"] == 1 and s["remote"]["discards"] == {}
    stack.flush(10)
    assert torch.equal(stack.load(b.key, b.token_ids), b.x)  # promoted good copy replaced the bad one
    assert stack.stats()["tiers"]["disk"]["verified_hits"] == 1
    stack.close(close_tiers=False)


def test_only_copy_bad_gives_none_and_is_removed(tmp_path):
    d = DiskTier(tmp_path)
    stack = TierStack([d], FP)
    b = make_block(1)
    d.put(b.key, b.blob())
    _corrupt_disk_file(d, b.key, "checksum")
    assert stack.load(b.key, b.token_ids) is None
    assert not d.path(b.key).exists() and not d.contains(b.key)
    assert stack.stats()["tiers"]["disk"]["discards"] == {"checksum": 1}
    stack.close()


class BlockingHost(HostTier):
    """A host tier whose puts wait for `release`: a stand-in for a slow disk or network."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.release = threading.Event()

    def put(self, key, blob):
        self.release.wait(30)
        return super().put(key, blob)


def test_full_mover_queue_drops_and_counts_and_never_blocks():
    slow = BlockingHost(1 << 20, pin_memory=False)
    nbytes = make_block(0).x.numel() * 4
    stack = TierStack([slow], FP, max_pending_bytes=3 * nbytes)
    blocks = [make_block(i) for i in range(6)]
    results = [stack.offer(b.key, b.token_ids, b.x) for b in blocks]  # returns while the mover is stuck
    assert results == [True, True, True, False, False, False]
    assert stack.flush(timeout=0.05) is False
    m = stack.stats()["mover"]
    assert m["accepted"] == {"offer": 3} and m["dropped"] == {"offer": 3}
    assert m["dropped_bytes"] == 3 * nbytes and m["pending_bytes"] == 3 * nbytes
    # queued blocks stay visible: found by lookup and served by load (token ids still checked)
    assert stack.lookup_prefix([b.key for b in blocks]) == ["host", "host", "host"]
    assert torch.equal(stack.load(blocks[2].key, blocks[2].token_ids), blocks[2].x)
    assert stack.load(blocks[2].key, blocks[3].token_ids) is None
    assert stack.load(blocks[4].key, blocks[4].token_ids) is None  # dropped: gone
    assert stack.stats()["mover"]["inflight_hits"] == 1
    slow.release.set()
    assert stack.flush(10)
    assert set(slow.keys()) == {b.key for b in blocks[:3]}
    assert stack.stats()["mover"]["pending_bytes"] == 0
    assert stack.offer(blocks[3].key, blocks[3].token_ids, blocks[3].x)  # room again
    stack.close()
    assert stack.offer(blocks[4].key, blocks[4].token_ids, blocks[4].x) is False  # closed: dropped


def test_pinned_blocks_survive_cascades(tmp_path):
    h, d = host(2), DiskTier(tmp_path, 2 * BLOB_BYTES)
    stack = TierStack([h, d], FP)
    blocks = [make_block(i) for i in range(6)]
    stack.offer(blocks[0].key, blocks[0].token_ids, blocks[0].x)
    stack.flush(10)
    assert stack.pin(blocks[0].key, "host")
    for b in blocks[1:]:
        stack.offer(b.key, b.token_ids, b.x)
        stack.flush(10)
    assert h.contains(blocks[0].key)
    stack.unpin(blocks[0].key, "host")
    with pytest.raises(KvstrataError, match="no tier named"):
        stack.pin(blocks[0].key, "ssd")
    stack.close()


def test_configuration_errors(tmp_path):
    with pytest.raises(KvstrataError, match="names must differ"):
        TierStack([host(), host()], FP)
    with pytest.raises(KvstrataError, match="codecs"):
        TierStack([host()], FP, codecs=["raw", "int8"])
    with pytest.raises(KvstrataError, match="unknown KV codec"):
        TierStack([host()], FP, codecs="lz4")
    with pytest.raises(KvstrataError, match="write policy"):
        TierStack([host()], FP, write_policy="write-back")


def test_concurrent_offers_and_loads_keep_stats_consistent(tmp_path):
    h, d = host(6), DiskTier(tmp_path, 12 * BLOB_BYTES)
    stack = TierStack([h, d], FP, max_pending_bytes=16 * BLOB_BYTES)
    blocks = [make_block(i) for i in range(24)]
    counts = {"offers": 0, "loads": 0, "wrong": 0}
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            b = rng.choice(blocks)
            if rng.random() < 0.5:
                stack.offer(b.key, b.token_ids, b.x)
                with lock:
                    counts["offers"] += 1
            else:
                y = stack.load(b.key, b.token_ids)
                with lock:
                    counts["loads"] += 1
                    counts["wrong"] += y is not None and not torch.equal(y, b.x)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert stack.flush(20)
    s = stack.stats()
    hs, ds, m = s["tiers"]["host"], s["tiers"]["disk"], s["mover"]
    assert counts["wrong"] == 0
    assert m["accepted"].get("offer", 0) + m["dropped"].get("offer", 0) == counts["offers"]
    from_tiers = counts["loads"] - m["inflight_hits"]  # the rest were served from the mover's queue
    assert hs["verified_hits"] + ds["verified_hits"] + s["load_misses"] == from_tiers
    assert hs["hits"] + hs["misses"] == from_tiers  # every such load asks the host tier first
    assert ds["hits"] + ds["misses"] == hs["misses"]  # and the disk tier when the host missed
    assert hs["discards"] == {} and ds["discards"] == {} and m["errors"] == 0
    assert hs["bytes"] == hs["blocks"] * BLOB_BYTES <= hs["capacity_bytes"]
    assert ds["bytes"] == ds["blocks"] * BLOB_BYTES <= ds["capacity_bytes"]
    assert ds["blocks"] == len(list(tmp_path.rglob("*.kvb")))
    assert m["pending_bytes"] == 0 and m["queued_jobs"] == 0
    stack.close()


def test_redis_down_under_the_stack_is_only_misses(own_redis, tmp_path):
    r = RedisTier(own_redis.url, backoff_initial_s=0.05)
    stack = TierStack([host(), r], FP, write_policy="write-through")
    b = make_block(1)
    own_redis.stop()
    assert stack.offer(b.key, b.token_ids, b.x) and stack.flush(10)
    assert stack.stats()["tiers"]["remote"]["mover_write_failures"] == 1
    stack.tiers[0].remove(b.key)
    assert stack.load(b.key, b.token_ids) is None
    assert stack.lookup_prefix([b.key]) == []
    stack.close()
