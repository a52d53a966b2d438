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

On CPU the maps are held as numpy arrays (`k_array`, `v_array`; bfloat16 as its 16-bit patterns), and
`k` / `v` are torch views of them made on first use: an engine whose every step runs in the native
step never imports torch (engine/llm_engine.py).

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
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from kvstrata.core import KvstrataError, dtype_name

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_HUGE = 2 << 20

STAGE_BYTES = 64 << 20  # host-to-GPU restore copies are staged in pinned buffers of at most this


ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # (bfloat16: its bit patterns)


def _reserved_zeros(shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray, mmap.mmap | None]:
    """Zeros of `shape` on the host, and the map behind them. POSIX: a view of a private anonymous map
    whose pages the kernel supplies zero-filled on first write, so nothing is resident until used.
    Elsewhere numpy zeros (and no map)."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * ITEMSIZE[dtype]
    if not hasattr(mmap, "MAP_ANONYMOUS") or nbytes == 0:
        return np.zeros(shape, dtype=_NP[dtype]), None
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    try:
        mm = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise KvstrataError(f"cannot reserve {nbytes} bytes of address space for the KV pool ({e.strerror}); "
                            "lower --kv-device-bytes or --kv-device-fraction") from None
    return np.frombuffer(mm, dtype=_NP[dtype], count=n).reshape(shape), mm  # the array keeps the map alive


def _torch_view(a: np.ndarray, dtype: str) -> torch.Tensor:
    import torch

    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


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
        dtype: Any = "float32",
        device: Any = "cpu",
    ) -> None:
        """`dtype`: float32, float16 or bfloat16 (a name or a torch dtype); `device`: a name or a torch
        device."""
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype_name = dtype_name(dtype)
        if self.dtype_name not in ITEMSIZE:
            raise KvstrataError(f"KV pool dtype must be float32, float16 or bfloat16, got {self.dtype_name}")
        self.element_size = ITEMSIZE[self.dtype_name]
        self.shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.layer_stride = num_blocks * block_size * num_kv_heads * head_dim  # elements from one layer to the next
        self.device_type = str(device).split(":")[0]
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._maps: list[mmap.mmap] = []
        self.k_array: np.ndarray | None = None  # the host memory (CPU pools)
        self.v_array: np.ndarray | None = None
        if self.device_type == "cpu":
            self.k_array, k_map = _reserved_zeros(self.shape, self.dtype_name)
            self.v_array, v_map = _reserved_zeros(self.shape, self.dtype_name)
            self._maps = [m for m in (k_map, v_map) if m is not None]
        else:
            import torch

            tdt = getattr(torch, self.dtype_name)
            self._k = torch.zeros(self.shape, dtype=tdt, device=device)
            self._v = torch.zeros(self.shape, dtype=tdt, device=device)
        # Huge pages only once each layer's blocks in use fill one (2 MiB): advised from the start, the
        # first block of every layer would make a whole huge page resident (~120 MiB for the default model
        # before a single token is cached).
        per_layer_block = block_size * num_kv_heads * head_dim * self.element_size
        self._huge_at = -(-_HUGE // per_layer_block) if self._maps and sys.platform == "linux" else None
        self._k_layers: list[torch.Tensor] | None = None
        self._v_layers: list[torch.Tensor] | None = None
        self.ref_count = [0] * num_blocks
        self.block_key: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_ids: deque[int] = deque()  # released blocks, reused before any fresh one
        self.num_touched = 0  # ids below this have been handed out (their memory is committed)
        self.cached_lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.key_to_block: dict[bytes, int] = {}
        self.evict_hooks: list[EvictHook] = []
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "token_mismatch": 0}

    # -- the memory ----------------------------------------------------------------------------------
    @property
    def k(self) -> torch.Tensor:
        """K of every layer (num_layers, num_blocks, block_size, KVH, d) as a torch tensor (on CPU a view of
        `k_array`, made on first use)."""
        if self._k is None:
            self._k = _torch_view(self.k_array, self.dtype_name)  # type: ignore[arg-type]
        return self._k

    @property
    def v(self) -> torch.Tensor:
        if self._v is None:
            self._v = _torch_view(self.v_array, self.dtype_name)  # type: ignore[arg-type]
        return self._v

    @property
    def k_layers(self) -> list[torch.Tensor]:
        """Views of `k`, one per layer."""
        if self._k_layers is None:
            self._k_layers = list(self.k.unbind(0))
        return self._k_layers

    @property
    def v_layers(self) -> list[torch.Tensor]:
        if self._v_layers is None:
            self._v_layers = list(self.v.unbind(0))
        return self._v_layers

    def pointers(self) -> tuple[int, int]:
        """Addresses of the K and V memory (what the native step reads and writes)."""
        if self.k_array is not None:
            return self.k_array.ctypes.data, self.v_array.ctypes.data  # type: ignore[union-attr]
        return self.k.data_ptr(), self.v.data_ptr()

    @staticmethod
    def bytes_per_block(block_size, num_layers, num_kv_heads, head_dim, dtype: Any = "float32") -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * ITEMSIZE[dtype_name(dtype)]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's K and V across all layers (the unit the tiers move)."""
        L, _, bs, kvh, d = self.shape
        return 2 * L * bs * kvh * d * self.element_size

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

    @property
    def numpy_payloads(self) -> bool:
        """Whether this pool's payloads are numpy arrays (a CPU pool numpy has the dtype of)."""
        return self.k_array is not None and self.dtype_name in ("float32", "float16")

    def block_payload(self, b: int):
        """(2, num_layers, block_size, KVH, d) copy of one block's K and V in host memory (the tiers'
        payload): a numpy array where `numpy_payloads`, else a CPU tensor."""
        if self.numpy_payloads:
            return np.stack((self.k_array[:, b], self.v_array[:, b]))  # type: ignore[index]
        import torch

        return torch.stack((self.k[:, b], self.v[:, b])).contiguous().cpu()

    def load_payload(self, b: int, payload) -> None:
        if isinstance(payload, np.ndarray) and self.numpy_payloads and payload.dtype == self.k_array.dtype:  # type: ignore[union-attr]
            self.k_array[:, b] = payload[0]  # type: ignore[index]
            self.v_array[:, b] = payload[1]  # type: ignore[index]
            return
        if isinstance(payload, np.ndarray):
            import torch

            payload = torch.from_numpy(payload)
        self.k[:, b].copy_(payload[0])
        self.v[:, b].copy_(payload[1])

    def _key(self, b: int) -> bytes:
        key = self.block_key[b]
        assert key is not None, f"block {b} is not registered"
        return key

    def load_payloads(self, blocks: list[int], payloads: list) -> None:
        """load_payload for many blocks. On a GPU the host payloads are staged in pinned memory and cross
        the bus in copies of up to STAGE_BYTES, then scattered on the device: one small pageable copy per
        layer and block was ~100x slower than the bus (a 4,096-token restore on an H200: 0.5 GB/s)."""
        if not blocks:
            return
        if self.device_type == "cpu":
            for b, p in zip(blocks, payloads):
                self.load_payload(b, p)
            return
        import torch

        payloads = [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in payloads]
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
