"""The device KV block pool with a content-addressed prefix cache.

Storage: per layer, K and V of shape (num_blocks, block_size, num_kv_heads, head_dim), held in two
tensors (num_layers, num_blocks, block_size, KVH, d) on the engine's device.

Every block is in exactly one state (the accounting invariant `free + cached + in_use == total`):
  - free: no content worth keeping, ref_count 0, in `free_ids`;
  - cached: ref_count 0 but holds a full block with a key, evictable, in the LRU `cached_lru`;
  - in use: ref_count > 0 (shared by every sequence whose prefix contains it).
A full block is registered under its chain-hash key (core.block_key); a lookup returns it only if the
stored token ids equal the requested ones, so a hash collision can never serve wrong KV.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict, deque
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


def _zeros_huge_pages(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """torch.zeros, but on CPU the 2 MiB-aligned interior is advised for transparent huge pages before
    the zero fill touches it: decode streams K/V rows across the whole pool, and with 4 KiB pages every
    few rows is a TLB miss. Advice only: where THP is off or madvise fails, nothing changes."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and sys.platform == "linux" and t.numel() * t.element_size() >= 2 * _HUGE:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
            end = (t.data_ptr() + t.numel() * t.element_size()) & ~(_HUGE - 1)
            if end > start:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
    return t.zero_()


# Called with (block_id, key, token_ids) just before a cached block's memory is reused; the block's
# K/V are still intact, so a tier stack can copy them down (write-on-evict).
EvictHook = Callable[[int, bytes, tuple[int, ...]], None]


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = _zeros_huge_pages(shape, dtype, device)
        self.v = _zeros_huge_pages(shape, dtype, device)
        self.k_layers = list(self.k.unbind(0))  # views, one per layer
        self.v_layers = list(self.v.unbind(0))
        self.ref_count = [0] * num_blocks
        self.block_key: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached_lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.key_to_block: dict[bytes, int] = {}
        self.evict_hooks: list[EvictHook] = []
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "token_mismatch": 0}

    @staticmethod
    def bytes_per_block(block_size, num_layers, num_kv_heads, head_dim, dtype=torch.float32) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's K and V across all layers (the unit the tiers move)."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    # -- accounting -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_cached(self) -> int:
        return len(self.cached_lru)

    @property
    def num_in_use(self) -> int:
        return sum(1 for r in self.ref_count if r > 0)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get now (free plus evictable cached)."""
        return len(self.free_ids) + len(self.cached_lru)

    def check_invariants(self) -> None:
        assert self.num_free + self.num_cached + self.num_in_use == self.num_blocks, self.summary()
        for b in self.cached_lru:
            assert self.ref_count[b] == 0 and self.block_key[b] is not None
        for b in self.free_ids:
            assert self.ref_count[b] == 0 and b not in self.cached_lru
        for key, b in self.key_to_block.items():
            assert self.block_key[b] == key

    def summary(self) -> dict[str, int]:
        return {"total": self.num_blocks, "free": self.num_free, "cached": self.num_cached, "in_use": self.num_in_use}

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block with ref_count 1 and no key. Evicts the least recently used cached block if needed."""
        if self.free_ids:
            b = self.free_ids.popleft()
        elif self.cached_lru:
            b, _ = self.cached_lru.popitem(last=False)
            key, toks = self.block_key[b], self.block_tokens[b]
            for hook in self.evict_hooks:
                hook(b, key, toks)
            del self.key_to_block[key]
            self.block_key[b] = self.block_tokens[b] = None
            self.stats["evictions"] += 1
        else:
            raise MemoryError("KV block pool exhausted")  # callers check num_available first
        self.ref_count[b] = 1
        return b

    def acquire(self, b: int) -> None:
        if self.ref_count[b] == 0:
            self.cached_lru.pop(b, None)
        self.ref_count[b] += 1

    def release(self, b: int) -> None:
        assert self.ref_count[b] > 0, f"block {b} released more often than acquired"
        self.ref_count[b] -= 1
        if self.ref_count[b] == 0:
            if self.block_key[b] is not None:
                self.cached_lru[b] = None  # most recently used end
            else:
                self.free_ids.append(b)

    # -- prefix cache -----------------------------------------------------------------------------
    def lookup(self, key: bytes, token_ids: Sequence[int]) -> int | None:
        b = self.key_to_block.get(key)
        if b is None:
            self.stats["misses"] += 1
            return None
        if self.block_tokens[b] != tuple(token_ids):
            self.stats["token_mismatch"] += 1
            return None
        self.stats["hits"] += 1
        return b

    def register(self, b: int, key: bytes, token_ids: Sequence[int]) -> bool:
        """Name a full block by its key. If another block already holds that key, keep the old one."""
        if key in self.key_to_block or self.block_key[b] is not None:
            return False
        self.block_key[b] = key
        self.block_tokens[b] = tuple(token_ids)
        self.key_to_block[key] = b
        return True

    def block_payload(self, b: int) -> torch.Tensor:
        """(2, num_layers, block_size, KVH, d) copy of one block's K and V (the tiers' payload)."""
        return torch.stack((self.k[:, b], self.v[:, b])).contiguous()

    def load_payload(self, b: int, payload: torch.Tensor) -> None:
        self.k[:, b].copy_(payload[0])
        self.v[:, b].copy_(payload[1])

    def drop_cached(self, b: int) -> None:
        """Forget one cached (unreferenced) block: its memory becomes free."""
        assert self.ref_count[b] == 0 and b in self.cached_lru
        del self.cached_lru[b]
        del self.key_to_block[self.block_key[b]]
        self.block_key[b] = self.block_tokens[b] = None
        self.free_ids.append(b)

    def reset_prefix_cache(self) -> int:
        """Drop every cached (unreferenced) block; returns how many."""
        n = len(self.cached_lru)
        for b in list(self.cached_lru):
            del self.key_to_block[self.block_key[b]]
            self.block_key[b] = self.block_tokens[b] = None
            self.free_ids.append(b)
        self.cached_lru.clear()
        return n
