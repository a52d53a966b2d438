"""Host tier: encoded blocks in DRAM under a byte budget, least recently used evicted first.

When CUDA is present, each blob is kept in page-locked (pinned) memory so that a later device copy can
be asynchronous; on a CPU-only machine blobs are plain `bytes`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from kvstrata.core import KvstrataError
from kvstrata.tiers.base import Blob, LocalIndexTier, check_key

logger = logging.getLogger(__name__)


def _cuda_available() -> bool:
    from kvstrata.startup import torch_may_have_cuda

    if not torch_may_have_cuda():  # (a CPU build of torch: not imported for the question)
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or a broken driver: stay on plain memory
        return False


class HostTier(LocalIndexTier):
    """A DRAM pool of `capacity_bytes`; LRU eviction of unpinned blocks.

    `pin_memory=None` pins when CUDA is available. Blob bytes are counted against the budget
    (the small per-entry bookkeeping is not).
    """

    name = "host"

    def __init__(self, capacity_bytes: int, *, pin_memory: bool | None = None, name: str = "host") -> None:
        if capacity_bytes <= 0:
            raise KvstrataError(f"host tier capacity must be > 0 bytes, got {capacity_bytes}")
        self.name = name
        super().__init__()
        self.capacity_bytes = int(capacity_bytes)
        self.pin_memory = _cuda_available() if pin_memory is None else pin_memory
        self._lock = threading.Lock()
        self._blobs: OrderedDict[bytes, object] = OrderedDict()  # key -> bytes | pinned uint8 tensor; LRU first
        self._sizes: dict[bytes, int] = {}
        self._pins: dict[bytes, int] = {}
        self._used = 0

    # ---- storage of one blob ----

    def _store(self, blob: bytes | bytearray | memoryview) -> object:
        if not self.pin_memory:
            return bytes(blob)
        import numpy as np
        import torch

        t = torch.empty(len(blob), dtype=torch.uint8, pin_memory=True)
        t.numpy()[:] = np.frombuffer(blob, dtype=np.uint8)
        return t

    @staticmethod
    def _load(stored: object) -> bytes | memoryview:
        """The stored bytes; a pinned blob as a view of its own page-locked memory, not a copy, so a
        restore copies it to the GPU at bus speed (nothing writes to a stored blob)."""
        return stored if isinstance(stored, bytes) else memoryview(stored.numpy())  # type: ignore[attr-defined]

    # ---- contract ----

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return check_key(key) in self._blobs

    def get(self, key: bytes) -> Blob | None:
        t0 = time.perf_counter()
        key = check_key(key)
        with self._lock:
            stored = self._blobs.get(key)
            if stored is not None:
                self._blobs.move_to_end(key)
        if stored is None:
            self._count(misses=1)
            return None
        blob = self._load(stored)
        self._count_hit(len(blob), t0)
        return blob

    def peek(self, key: bytes, nbytes: int | None = None) -> Blob | None:
        with self._lock:
            stored = self._blobs.get(check_key(key))
        if stored is None:
            return None
        blob = self._load(stored)
        return blob if nbytes is None else blob[:nbytes]

    def put(self, key: bytes, blob: bytes | bytearray | memoryview) -> bool:
        t0 = time.perf_counter()
        key, size = check_key(key), len(blob)
        with self._lock:
            if key in self._sizes:  # present, or being stored by another thread
                if key in self._blobs:
                    self._blobs.move_to_end(key)
                return True
            victims = self._make_room(size)
            if victims is None:
                self._count(put_failures=1)
                return False
            evicted = [(k, self._blobs.pop(k)) for k in victims]
            for k in victims:
                self._used -= self._sizes.pop(k)
            # Reserve the bytes now so concurrent puts see them; the copy happens below.
            self._sizes[key] = size
            self._used += size
        # Victims go to the listener first, so a block on its way down is out of sight only briefly.
        self._notify_evicted([(k, self._load(s)) for k, s in evicted] if self._evict_listener else
                             [(k, None) for k, _ in evicted])
        try:
            stored = self._store(blob)
        except Exception as e:  # out of (pinned) memory: a failed put, never an engine error
            logger.warning("host tier could not store %d bytes: %s", size, e)
            with self._lock:
                self._used -= self._sizes.pop(key, 0)
            self._count(put_failures=1, errors=1)
            return False
        with self._lock:
            self._blobs[key] = stored
        self._count_put(size, t0)
        return True

    def _make_room(self, size: int) -> list[bytes] | None:
        """LRU unpinned keys to evict so `size` more bytes fit, or None if they cannot. Lock held."""
        if size > self.capacity_bytes:
            return None
        need = self._used + size - self.capacity_bytes
        victims: list[bytes] = []
        if need <= 0:
            return victims
        for k in self._blobs:  # least recently used first
            if self._pins.get(k):
                continue
            victims.append(k)
            need -= self._sizes[k]
            if need <= 0:
                return victims
        return None

    def remove(self, key: bytes) -> None:
        key = check_key(key)
        with self._lock:
            if self._blobs.pop(key, None) is not None:
                self._used -= self._sizes.pop(key)
                self._pins.pop(key, None)

    def _block_index(self) -> dict:
        return self._blobs

    def _usage(self) -> tuple[int | None, int | None, int | None, int]:
        with self._lock:
            return len(self._blobs), self._used, self.capacity_bytes, len(self._pins)
