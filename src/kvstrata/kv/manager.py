"""Per-sequence block tables over the BlockPool: prefix matching, slot allocation, registration, free;
and the prefix-level operations sessions use between turns (hold, release, locate).

The scheduler calls these; it never touches the pool's dicts. A sequence is anything with the
attributes of `SeqBlocks` (sched/sequence.py's Sequence is the one the engine runs): this package
does not import the scheduler.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

from kvstrata.core import block_key, chain_keys
from kvstrata.kv.pool import BlockPool

log = logging.getLogger(__name__)


class SeqBlocks(Protocol):
    """What the KV manager reads and writes of a sequence: its tokens, progress and block table."""

    block_table: list[int]  # pool block ids, one per block_size tokens
    block_keys: list[bytes]  # chain keys of the registered (full, computed) blocks, in order
    num_computed_tokens: int
    num_preemptions: int
    metrics: Any  # core.RequestMetrics: cached_prompt_tokens(_by_tier) are set at admission
    last_hit_by_tier: dict[str, int]

    @property
    def all_token_ids(self) -> list[int]: ...

    def token_at(self, i: int) -> int: ...


class BlockListener(Protocol):
    """Told, on the engine thread, when named blocks enter or leave the device pool (e.g. a KV-event
    publisher for a cluster router). `stored` gets a run of chained keys: each key's parent is the one
    before it, the first one's is `parent`; token_ids are the run's tokens. Evictions reach listeners
    through the pool's `evict_hooks`."""

    def stored(self, keys: Sequence[bytes], parent: bytes | None, token_ids: Sequence[int]) -> None: ...

    def removed(self, keys: Sequence[bytes]) -> None: ...


class KVManager:
    def __init__(self, pool: BlockPool, fingerprint: str, enable_prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.fingerprint = fingerprint
        self.enable_prefix_caching = enable_prefix_caching
        # Optional lower tiers (kv/offload.py, set by the engine): blocks the pool no longer holds.
        self.offload = None
        self.listeners: list[BlockListener] = []  # blocks computed or loaded into the pool

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: SeqBlocks) -> int:
        """Attach cached blocks for the longest cached prefix of seq's tokens; returns tokens reused.

        At least one token is always left to compute, so the step that finishes the prompt yields logits.
        Blocks missing from the pool are asked of the lower tiers (if any), in order, until one misses.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        toks = seq.all_token_ids
        bs = self.block_size
        max_blocks = (len(toks) - 1) // bs
        parent = None
        by_tier: dict[str, int] = {}
        chunks = [toks[i * bs : (i + 1) * bs] for i in range(max_blocks)]
        keys: list[bytes] = []
        for chunk in chunks:
            parent = block_key(parent, chunk, self.fingerprint)
            keys.append(parent)
        for key, chunk in zip(keys, chunks):  # device first
            b = self.pool.lookup(key, chunk)
            if b is None:
                break
            self.pool.acquire(b)
            self._attach(seq, b, key, "device", by_tier)
        i = len(seq.block_table)
        if self.offload is not None and i < max_blocks:  # then the tiers below, each load verified
            names = self.offload.lookup(keys[i:])
            run = list(zip(keys[i : i + len(names)], chunks[i : i + len(names)]))
            for name, (key, _), b in zip(names, run, self.offload.load_blocks(run)):
                self._attach(seq, b, key, name, by_tier)
            loaded = len(seq.block_table) - i
            if loaded and self.listeners:
                self._stored(keys[i : i + loaded], keys[i - 1] if i else None, toks[i * bs : (i + loaded) * bs])
        n = len(seq.block_table) * bs
        seq.num_computed_tokens = n
        if seq.num_preemptions == 0:  # usage reports the first admission; re-admissions count below
            seq.metrics.cached_prompt_tokens = n
            seq.metrics.cached_prompt_tokens_by_tier = by_tier
        seq.last_hit_by_tier = by_tier
        return n

    def _attach(self, seq: SeqBlocks, b: int, key: bytes, tier: str, by_tier: dict[str, int]) -> None:
        seq.block_table.append(b)
        seq.block_keys.append(key)
        by_tier[tier] = by_tier.get(tier, 0) + self.block_size

    def can_allocate(self, seq: SeqBlocks, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.pool.num_available

    def allocate_slots(self, seq: SeqBlocks, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self.pool.allocate())

    def commit(self, seq: SeqBlocks) -> None:
        """Register every block of seq that became full (all its tokens computed) since last time."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        first = len(seq.block_keys)
        parent = seq.block_keys[-1] if seq.block_keys else None
        for i in range(first, full):
            chunk = [seq.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            key = block_key(parent, chunk, self.fingerprint)
            b = seq.block_table[i]
            if self.pool.register(b, key, chunk) and self.offload is not None:
                self.offload.on_register(b, key, chunk)
            seq.block_keys.append(key)
            parent = key
        if self.listeners and full > first:
            self._stored(seq.block_keys[first:full], seq.block_keys[first - 1] if first else None,
                         [seq.token_at(j) for j in range(first * bs, full * bs)])

    def _stored(self, keys: Sequence[bytes], parent: bytes | None, token_ids: Sequence[int]) -> None:
        for listener in self.listeners:
            listener.stored(keys, parent, token_ids)

    def free(self, seq: SeqBlocks) -> None:
        """Release seq's blocks, tail first, so the LRU evicts a prefix's tail before its head."""
        for b in reversed(seq.block_table):
            self.pool.release(b)
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed_tokens = 0

    # -- prefixes between turns (sessions/kv.py) --------------------------------------------------
    def hold(self, token_ids: Sequence[int]) -> list[int]:
        """Take a reference on the device blocks of the longest cached prefix of token_ids, so the LRU
        cannot evict them; returns the blocks (give them back with `release`)."""
        held = []
        for key in chain_keys(token_ids, self.block_size, self.fingerprint):
            b = self.pool.key_to_block.get(key)
            if b is None:
                break
            self.pool.acquire(b)
            held.append(b)
        return held

    def release(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self.pool.release(b)

    def locate(self, token_ids: Sequence[int]) -> dict[str, int]:
        """Tokens of the longest stored prefix of token_ids, by the fastest place holding each block
        ("device", then the tiers' names)."""
        if self.offload is not None:
            return self.offload.locate(token_ids)
        keys = chain_keys(token_ids, self.block_size, self.fingerprint)
        n = next((i for i, k in enumerate(keys) if k not in self.pool.key_to_block), len(keys))
        return {"device": n * self.block_size} if n else {}
