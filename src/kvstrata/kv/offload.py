"""The device pool's link to the tiers below it (host, disk, remote): write-down, write-behind,
verified reload, park / prefetch / locate of a token prefix.

Built from EngineConfig by `build_tier_stack`; None when no tier is configured. All methods run on the
engine thread; the TierStack's own mover thread does the queued writes.

Write-behind (the default policy): each block, as soon as it is full and registered, is queued for the
durable tiers (disk, remote); the mover writes it behind the step loop. A block is on disk once the
mover has written it (a temp file, fsync, rename), typically milliseconds after it filled. A session
turn is recorded (and its reply sent) only once its own blocks are written (`wait_durable`, bounded by
sessions/turns.DURABLE_WAIT_S), so a SIGKILL after a turn completes loses none of its KV; a process
killed before that loses only the blocks not yet written, which the next turn recomputes (every load
is verified, so a partial write is never used). The window stays open only when the mover's queue was
full (the block was dropped, counted in `write_behind_dropped`) or the wait timed out (logged). Only newly computed blocks are registered, so a
session's growing prefix is written once; keys known written are remembered (a bounded LRU) so a
later eviction does not write them again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

from kvstrata.config import EngineConfig
from kvstrata.core import KvstrataError, chain_keys
from kvstrata.kv.pool import BlockPool

if TYPE_CHECKING:
    from kvstrata.tiers.base import Tier

log = logging.getLogger(__name__)

DEFAULT_DISK_BYTES = 10 << 30
DURABLE_KEYS_REMEMBERED = 1 << 16  # keys known written to the durable tiers (about 1M tokens of blocks)


def build_tier_stack(cfg: EngineConfig, fingerprint: str, pool: BlockPool | None = None):
    """The TierStack the config asks for (host, disk, remote, fastest first), or None. With the `pool`,
    the disk tier knows how large a block can be and never reads a larger file."""
    if not (cfg.kv_host_bytes or cfg.kv_disk_dir or cfg.kv_redis_url):
        return None  # (before importing the tiers, which need torch)
    from kvstrata.tiers import DiskTier, HostTier, RedisTier, TierStack
    from kvstrata.tiers.codec import max_encoded_bytes

    tiers: list[Tier] = []
    codecs: list[str] = []
    if cfg.kv_host_bytes:
        tiers.append(HostTier(cfg.kv_host_bytes))
        codecs.append("raw")
    if cfg.kv_disk_dir:
        most = max_encoded_bytes((2, pool.shape[0], *pool.shape[2:]), pool.dtype_name, len(fingerprint)) if pool else None
        tiers.append(DiskTier(cfg.kv_disk_dir, cfg.kv_disk_bytes or DEFAULT_DISK_BYTES, max_blob_bytes=most))
        codecs.append(cfg.kv_cold_codec)
    if cfg.kv_redis_url:
        tiers.append(RedisTier(cfg.kv_redis_url))
        codecs.append(cfg.kv_cold_codec)
    if not tiers:
        return None
    return TierStack(tiers, fingerprint, codecs, write_policy=cfg.kv_write_policy)


class Offload:
    def __init__(self, pool: BlockPool, stack, fingerprint: str) -> None:
        self.pool = pool
        self.stack = stack
        self.fingerprint = fingerprint
        self.tier_names = [t.name for t in stack.tiers]
        self.counters = {"blocks_written_down": 0, "blocks_loaded": 0, "blocks_load_failed": 0, "offers_dropped": 0,
                         "blocks_written_behind": 0, "write_behind_dropped": 0}
        self._durable: OrderedDict[bytes, None] = OrderedDict()  # keys queued for / written to durable tiers
        targets = stack.policy.offer_targets(len(stack.tiers))
        self._evict_targets_durable = bool(targets) and all(stack.tiers[i].durable for i in targets)
        pool.evict_hooks.append(self._on_evict)
        self.listeners: list = []  # kv.manager.BlockListener: told of blocks prefetched into / parked out of the pool

    # -- write-down -------------------------------------------------------------------------------
    def _on_evict(self, b: int, key: bytes, token_ids: tuple[int, ...]) -> None:
        if self.stack.offer_on_compute:  # write-through: it is already below
            return
        if self._evict_targets_durable and key in self._durable:  # written behind already
            return
        self._offer(b, key, token_ids)

    def on_register(self, b: int, key: bytes, token_ids: Sequence[int]) -> None:
        """A block became full: write-through offers it to every tier, write-behind to the durable ones."""
        if self.stack.offer_on_compute:
            self._offer(b, key, token_ids)
            return
        targets = self.stack.durable_targets
        if not targets:
            return
        if self.stack.offer(key, token_ids, self.pool.block_payload(b), targets):
            self.counters["blocks_written_behind"] += 1
            self._durable[key] = None
            if len(self._durable) > DURABLE_KEYS_REMEMBERED:
                self._durable.popitem(last=False)
        else:  # the mover's queue is full: this block is recomputed if it is ever needed after a crash
            self.counters["write_behind_dropped"] += 1

    def wait_durable(self, keys: Sequence[bytes], timeout: float | None) -> bool:
        """Wait (any thread) until the writes queued for `keys` are done (at once when none is queued);
        False if `timeout` seconds passed first."""
        return self.stack.wait_written(keys, timeout)

    def _offer(self, b: int, key: bytes, token_ids: Sequence[int]) -> None:
        if self.stack.offer(key, token_ids, self.pool.block_payload(b)):
            self.counters["blocks_written_down"] += 1
        else:
            self.counters["offers_dropped"] += 1

    def offer_blocks(self, blocks: Sequence[int]) -> None:
        """Write these registered device blocks down now (a preempted sequence moving down)."""
        for b in blocks:
            key, toks = self.pool.block_key[b], self.pool.block_tokens[b]
            if key is not None and toks is not None and not self.stack.offer_on_compute:
                self._offer(b, key, toks)

    # -- reload -----------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        return self.stack.lookup_prefix(keys)

    def load_blocks(self, items: Sequence[tuple[bytes, Sequence[int]]]) -> list[int]:
        """Loads a run of verified blocks into fresh pool blocks (ref_count 1, registered), in order, until
        one misses or the pool has no room; their payloads cross to the device together
        (BlockPool.load_payloads). Returns the blocks loaded."""
        blocks: list[int] = []
        payloads = []
        for key, token_ids in items:
            if self.pool.num_available == 0:
                break
            payload = self.stack.load(key, token_ids, numpy=self.pool.numpy_payloads)
            if payload is None:
                self.counters["blocks_load_failed"] += 1
                break
            b = self.pool.allocate()
            self.pool.register(b, key, token_ids)  # (the data follows below, before anything reads it)
            blocks.append(b)
            payloads.append(payload)
        self.pool.load_payloads(blocks, payloads)
        self.counters["blocks_loaded"] += len(blocks)
        return blocks

    def load_block(self, key: bytes, token_ids: Sequence[int]) -> int | None:
        """load_blocks of one block: its pool block, or None on a miss."""
        blocks = self.load_blocks([(key, token_ids)])
        return blocks[0] if blocks else None

    # -- sessions ---------------------------------------------------------------------------------
    def _chain(self, token_ids: Sequence[int]) -> list[tuple[bytes, list[int]]]:
        bs = self.pool.block_size
        keys = chain_keys(token_ids, bs, self.fingerprint)
        return [(k, list(token_ids[i * bs : (i + 1) * bs])) for i, k in enumerate(keys)]

    def locate(self, token_ids: Sequence[int]) -> dict[str, int]:
        """Tokens of the longest stored prefix of token_ids, by the fastest tier holding each block."""
        bs = self.pool.block_size
        out: dict[str, int] = {}
        chain = self._chain(token_ids)
        i = 0
        while i < len(chain) and chain[i][0] in self.pool.key_to_block:
            i += 1
        if i:
            out["device"] = i * bs
        for name in self.lookup([k for k, _ in chain[i:]]):
            out[name] = out.get(name, 0) + bs
        return out

    def park(self, token_ids: Sequence[int], tier: str, pin: bool = True) -> dict[str, int]:
        """Writes the prefix's blocks to `tier` now (synchronously) and frees their device copies.

        Blocks still used by a running sequence stay in device memory too. Pinned blocks are never
        evicted from that tier until `unpin` (the session's lease).
        """
        from kvstrata.tiers import codec as kvcodec

        if tier not in self.tier_names:
            raise KvstrataError(f"tier {tier!r} is not configured; configured tiers: {self.tier_names}")
        idx = self.tier_names.index(tier)
        t, codec = self.stack.tiers[idx], self.stack.codecs[idx]
        written = already = dropped = failed = 0
        freed: list[bytes] = []
        for key, toks in self._chain(token_ids):
            b = self.pool.key_to_block.get(key)
            if not t.contains(key):
                if b is None:
                    payload = self.stack.load(key, toks, numpy=True)  # only in another tier: copy it across
                    if payload is None:
                        break
                else:
                    payload = self.pool.block_payload(b)
                blob = kvcodec.encode(payload, key=key, token_ids=toks, fingerprint=self.fingerprint, codec=codec)
                if not t.put(key, blob):
                    failed += 1
                    break
                written += 1
            else:
                already += 1
            if pin:
                t.pin(key)
            if b is not None and self.pool.ref_count[b] == 0:
                self.pool.drop_cached(b)
                dropped += 1
                freed.append(key)
        if freed:
            for listener in self.listeners:
                listener.removed(freed)
        return {"blocks_written": written, "blocks_already_there": already, "device_blocks_freed": dropped,
                "failed": failed, "tokens": (written + already) * self.pool.block_size}

    def unpin(self, token_ids: Sequence[int], tier: str) -> None:
        t = self.stack.tiers[self.tier_names.index(tier)]
        for key, _ in self._chain(token_ids):
            t.unpin(key)

    def prefetch(self, token_ids: Sequence[int]) -> int:
        """Loads the prefix's stored blocks back into the device pool (as cached blocks); tokens loaded."""
        loaded = 0
        parent = None
        for key, toks in self._chain(token_ids):
            if key not in self.pool.key_to_block:
                b = self.load_block(key, toks)
                if b is None:
                    break
                self.pool.release(b)  # unreferenced but cached: the next request's prefix match takes it
                loaded += self.pool.block_size
                for listener in self.listeners:
                    listener.stored([key], parent, toks)
            parent = key
        return loaded

    def flush_device(self) -> int:
        """Offers every cached device block down (for a graceful shutdown under write-on-evict)."""
        n = 0
        for b in list(self.pool.cached_lru):
            key, toks = self.pool.block_key[b], self.pool.block_tokens[b]
            if key is not None and toks is not None:  # (cached blocks are registered)
                self._offer(b, key, toks)
                n += 1
        return n

    def stats(self) -> dict:
        return {**self.stack.stats(), "engine": dict(self.counters)}

    def close(self) -> None:
        self.stack.close()
