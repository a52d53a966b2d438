"""The device KV block pool with a content-addressed prefix cache.

Storage: per layer, K and V of shape (num_blocks, block_size, num_kv_heads, head_dim), held in two
tensors (num_layers, num_blocks, block_size, KVH, d) on the engine's device.

Memory sized to the work: on CPU the two tensors are views of anonymous memory maps reserved for the
whole pool (`num_blocks`, the cap) but committed by the kernel page by page, zero-filled, only when
first written; blocks never handed out cost address space, not RAM. A fresh block is handed out
only when no released one is free (`allocate`: a released block, then a fresh one, then the least
recently used cached block, evicted), so resident memory follows the most blocks the pool has held at
once (in use plus cached), not the cap: the cap is reached only by work (or a prefix cache) that
fills it. The tensors never move: model/attention.py's
per-layer views and the native decode step's pointers (native/decode.py) stay valid, with nothing to
re-point. On CUDA the pool is allocated up front (device memory is the engine's alone).

Every block is in exactly one state (the accounting invariant `free + cached + in_use == total`):
  - free: no content worth keeping, ref_count 0; either released (in `free_ids`) or never handed out
    (ids from `num_touched` up);
  - cached: ref_count 0 but holds a full block with a key, evictable, in the LRU `cached_lru`;
  - in use: ref_count > 0 (shared by every sequence whose prefix contains it).
A full block is registered under its chain-hash key (core.block_key); a lookup returns it only if the
stored token ids equal the requested ones, so a hash collision can never serve wrong KV.
"""

from __future__ import annotations

import logging
import mmap
import sys
from collections import OrderedDict, deque
from typing import Callable, Sequence

import torch

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)
_HUGE = 2 << 20

STAGE_BYTES = 64 << 20  # host-to-GPU restore copies are staged in pinned buffers of at most this


def _reserved_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, mmap.mmap | None]:
    """Zeros of `shape`, and the map behind them. On CPU (POSIX): a view of a private anonymous map whose
    pages the kernel supplies zero-filled on first write, so nothing is resident until used. Elsewhere
    torch.zeros (and no map)."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty(0, dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MAP_ANONYMOUS") or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device), None
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    try:
        mm = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise KvstrataError(f"cannot reserve {nbytes} bytes of address space for the KV pool ({e.strerror}); "
                            "lower --kv-device-bytes or --kv-device-fraction") from None
    return torch.frombuffer(mm, dtype=dtype, count=n).view(shape), mm  # the tensor keeps the map alive


def _advise_huge_pages(maps: list[mmap.mmap]) -> None:
    """Transparent huge pages for the rest of the pool: decode streams K/V rows across it, and with 4 KiB
    pages every few rows is a TLB miss. Advice only (where THP is off nothing changes)."""
    for mm in maps:
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass


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
        self.k, k_map = _reserved_zeros(shape, dtype, device)
        self.v, v_map = _reserved_zeros(shape, dtype, device)
        # Huge pages only once each layer's blocks in use fill one (2 MiB): advised from the start, the
        # first block of every layer would make a whole huge page resident (~120 MiB for the default model
        # before a single token is cached).
        self._maps = [m for m in (k_map, v_map) if m is not None]
        per_layer_block = self.k[0, 0].numel() * self.k.element_size()
        self._huge_at = -(-_HUGE // per_layer_block) if self._maps and sys.platform == "linux" else None
        self.k_layers = list(self.k.unbind(0))  # views, one per layer
        self.v_layers = list(self.v.unbind(0))
        self.ref_count = [0] * num_blocks
        self.block_key: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_ids: deque[int] = deque()  # released blocks, reused before any fresh one
        self.num_touched = 0  # ids below this have been handed out (their memory is committed)
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
        return len(self.free_ids) + self.num_blocks - self.num_touched

    @property
    def num_cached(self) -> int:
        return len(self.cached_lru)

    @property
    def num_in_use(self) -> int:
        return sum(1 for r in self.ref_count if r > 0)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get now (free plus evictable cached)."""
        return self.num_free + len(self.cached_lru)

    @property
    def committed_bytes(self) -> int:
        """Bytes of the blocks handed out so far (what the pool has made resident, at page granularity)."""
        return self.num_touched * self.block_bytes

    def check_invariants(self) -> None:
        assert self.num_free + self.num_cached + self.num_in_use == self.num_blocks, self.summary()
        for b in self.cached_lru:
            assert self.ref_count[b] == 0 and self.block_key[b] is not None
        for b in self.free_ids:
            assert self.ref_count[b] == 0 and b not in self.cached_lru and b < self.num_touched
        assert all(self.ref_count[b] == 0 and self.block_key[b] is None for b in range(self.num_touched, self.num_blocks))
        for key, b in self.key_to_block.items():
            assert self.block_key[b] == key

    def summary(self) -> dict[str, int]:
        return {"total": self.num_blocks, "free": self.num_free, "cached": self.num_cached, "in_use": self.num_in_use}

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block with ref_count 1 and no key: a released one, else a fresh one, else the least recently
        used cached block, evicted."""
        if self.free_ids:
            b = self.free_ids.popleft()
        elif self.num_touched < self.num_blocks:
            b = self.num_touched
            self.num_touched += 1
            if self.num_touched == self._huge_at:
                _advise_huge_pages(self._maps)
        elif self.cached_lru:
            b, _ = self.cached_lru.popitem(last=False)
            key, toks = self.block_key[b], self.block_tokens[b]
            assert key is not None and toks is not None  # a cached block is registered
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

    def _key(self, b: int) -> bytes:
        key = self.block_key[b]
        assert key is not None, f"block {b} is not registered"
        return key

    def load_payloads(self, blocks: list[int], payloads: list[torch.Tensor]) -> None:
        """load_payload for many blocks. On a GPU the host payloads are staged in pinned memory and cross
        the bus in copies of up to STAGE_BYTES, then scattered on the device: one small pageable copy per
        layer and block was ~100x slower than the bus (a 4,096-token restore on an H200: 0.5 GB/s)."""
        if not blocks:
            return
        if self.k.device.type == "cpu":
            for b, p in zip(blocks, payloads):
                self.load_payload(b, p)
            return
        dev_type = self.k.device
        if all(p.is_pinned() for p in payloads):  # (a pinned host tier's blobs): straight across
            for b, p in zip(blocks, payloads):
                self.k[:, b].copy_(p[0].to(dev_type, non_blocking=True))
                self.v[:, b].copy_(p[1].to(dev_type, non_blocking=True))
            torch.cuda.current_stream(dev_type).synchronize()  # the tier may free a blob once this returns
            return
        per = max(1, STAGE_BYTES // (payloads[0].numel() * payloads[0].element_size()))
        for i in range(0, len(blocks), per):
            chunk = payloads[i : i + per]
            host = torch.empty((len(chunk), *chunk[0].shape), dtype=chunk[0].dtype, pin_memory=True)
            torch.stack(chunk, out=host)
            dev = host.to(self.k.device)  # (n, 2, L, T, H, D); from pinned memory: one DMA at bus speed
            idx = torch.tensor(blocks[i : i + per], dtype=torch.long, device=self.k.device)
            self.k.index_copy_(1, idx, dev[:, 0].transpose(0, 1))
            self.v.index_copy_(1, idx, dev[:, 1].transpose(0, 1))

    def drop_cached(self, b: int) -> None:
        """Forget one cached (unreferenced) block: its memory becomes free."""
        assert self.ref_count[b] == 0 and b in self.cached_lru
        del self.cached_lru[b]
        del self.key_to_block[self._key(b)]
        self.block_key[b] = self.block_tokens[b] = None
        self.free_ids.append(b)

    def reset_prefix_cache(self) -> int:
        """Drop every cached (unreferenced) block; returns how many."""
        n = len(self.cached_lru)
        for b in list(self.cached_lru):
            del self.key_to_block[self._key(b)]
            self.block_key[b] = self.block_tokens[b] = None
            self.free_ids.append(b)
        self.cached_lru.clear()
        return n
