"""The one contract every KV store below device memory keeps: host DRAM, local disk, Redis / Valkey.

A tier maps a 32-byte block key (kvstrata.core.block_key) to an *encoded blob* (kvstrata.tiers.codec):
header + checksum + payload. A tier never interprets the blob; verification is the tier stack's job.
Single-item calls are the primitives; batched (`*_many`) and non-blocking (`*_async`) forms are
built from them here and may be overridden by a tier that can do better (Redis pipelines).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence

from kvstrata.core import BLOCK_KEY_BYTES

logger = logging.getLogger(__name__)

# Called with (key, blob) for each block a tier evicts to make room; the tier stack uses it to write
# victims down to the next tier. Called outside the tier's lock, on the thread whose `put` evicted.
EvictListener = Callable[[bytes, "Blob"], None]


def check_key(key: bytes) -> bytes:
    """Internal invariant: keys are exactly BLOCK_KEY_BYTES bytes."""
    assert isinstance(key, (bytes, bytearray)) and len(key) == BLOCK_KEY_BYTES, f"bad block key {key!r}"
    return bytes(key)


Blob = bytes | bytearray | memoryview  # what a tier hands back: its bytes, a buffer, or a view of its memory


@dataclass
class TierStats:
    """Counters of one tier since it was opened (hits / misses count `get` calls only).

    `blocks` / `bytes` are what the tier holds now (None where the tier cannot tell cheaply).
    `read_s` / `write_s` are seconds spent inside successful `get` / `put` calls, so
    `bytes_read / read_s` is the achieved read bandwidth including the tier's own overhead.
    """

    name: str
    blocks: int | None = 0
    bytes: int | None = 0
    capacity_bytes: int | None = None
    pinned: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    read_s: float = 0.0
    write_s: float = 0.0
    puts: int = 0
    put_failures: int = 0  # put returned False: no room (all pinned), disk full, read-only, server down
    evictions: int = 0
    errors: int = 0  # I/O or network errors (each also turned into a miss or a failed put)

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    @property
    def read_gbps(self) -> float | None:
        return self.bytes_read / self.read_s / 1e9 if self.read_s > 0 else None

    @property
    def write_gbps(self) -> float | None:
        return self.bytes_written / self.write_s / 1e9 if self.write_s > 0 else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, read_gbps=self.read_gbps, write_gbps=self.write_gbps)
        return d


class Tier(abc.ABC):
    """A key -> encoded-blob store below device memory. Every method is thread-safe.

    Contract, for every implementation:
    - `get(key)` returns the blob exactly as it was `put`, or None. None means "miss" for every reason:
      absent, evicted, expired, I/O error, server unreachable. `get` never raises for those reasons.
    - `put(key, blob)` returns True when the blob is stored whole, False when it is not (no room because
      every block is pinned, disk full, read-only directory, server down). It never raises for those
      reasons, and a False leaves no partial block behind that a later `get` could return.
      Putting a key that is already present may keep the old blob (keys are content addresses).
    - `put` may evict other, unpinned blocks to stay within the tier's byte budget; each victim is
      reported to the evict listener (see `set_evict_listener`) where the tier can do so.
    - `pin(key)` marks a present block as not evictable and returns True; False if it is absent.
      Pins count: n pins need n unpins. Pins live in this process only (not persisted).
    - `remove(key)` deletes the block if present (pins or not); removing an absent key is a no-op.
    - `keys()` iterates the keys present (a snapshot; may be stale by the time it is used).
    - `stats()` is cheap (no full scan) and returns a TierStats.
    - `close()` releases files / sockets / threads; the tier must not be used afterwards.
    """

    name: str = "tier"
    durable: bool = False  # the blocks outlive this process (a disk, a server): write-behind targets

    def __init__(self) -> None:
        self._stats_lock = threading.Lock()
        self._counters = TierStats(name=self.name)
        self._evict_listener: EvictListener | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    # ---- primitives every tier implements -------------------------------------------------------

    @abc.abstractmethod
    def contains(self, key: bytes) -> bool:
        """True if `get(key)` would (very likely) return a blob now. Counts no hit or miss."""

    @abc.abstractmethod
    def get(self, key: bytes) -> Blob | None:
        """The blob stored under `key`, or None (a miss, for any reason). Never raises on I/O errors."""

    @abc.abstractmethod
    def put(self, key: bytes, blob: bytes) -> bool:
        """Store `blob` whole under `key`; True on success. Never raises on I/O errors or no room."""

    @abc.abstractmethod
    def remove(self, key: bytes) -> None:
        """Delete the block if present, pinned or not."""

    @abc.abstractmethod
    def pin(self, key: bytes) -> bool:
        """Protect a present block from eviction (counted); False if absent."""

    @abc.abstractmethod
    def unpin(self, key: bytes) -> None:
        """Undo one `pin`; unpinning a key that is not pinned is a no-op."""

    @abc.abstractmethod
    def keys(self) -> Iterator[bytes]:
        """The keys present now."""

    @abc.abstractmethod
    def _usage(self) -> tuple[int | None, int | None, int | None, int]:
        """(blocks, bytes, capacity_bytes, pinned) held now; cheap."""

    def peek(self, key: bytes, nbytes: int | None = None) -> Blob | None:
        """The first `nbytes` (all if None) of a block, for inspection: no hit / miss counted, no
        recency refreshed. The default goes through `get`; tiers override it where that matters."""
        blob = self.get(key)
        return blob if blob is None or nbytes is None else blob[:nbytes]

    # ---- built from the primitives --------------------------------------------------------------

    def stats(self) -> TierStats:
        blocks, nbytes, cap, pinned = self._usage()
        with self._stats_lock:
            s = TierStats(**{**self._counters.__dict__})
        s.name, s.blocks, s.bytes, s.capacity_bytes, s.pinned = self.name, blocks, nbytes, cap, pinned
        return s

    def set_evict_listener(self, listener: EvictListener | None) -> None:
        """Have `listener(key, blob)` called for each block this tier evicts (None to stop)."""
        self._evict_listener = listener

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[Blob | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> list[bool]:
        return [self.put(k, b) for k, b in items]

    def remove_many(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            self.remove(k)

    def get_async(self, key: bytes) -> "Future[Blob | None]":
        """`get` on this tier's I/O thread; the Future never holds an exception for I/O errors."""
        return self._pool().submit(self.get, key)

    def put_async(self, key: bytes, blob: bytes) -> "Future[bool]":
        return self._pool().submit(self.put, key, blob)

    def get_many_async(self, keys: Sequence[bytes]) -> "Future[list[Blob | None]]":
        return self._pool().submit(self.get_many, list(keys))

    def put_many_async(self, items: Iterable[tuple[bytes, bytes]]) -> "Future[list[bool]]":
        return self._pool().submit(self.put_many, list(items))

    def clear(self) -> int:
        """Remove every block; returns how many were removed."""
        n = 0
        for k in list(self.keys()):
            self.remove(k)
            n += 1
        return n

    def close(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> "Tier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers for implementations ------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"kv-{self.name}")
            return self._executor

    def _count(self, **incs: float) -> None:
        with self._stats_lock:
            c = self._counters
            for field_name, inc in incs.items():
                setattr(c, field_name, getattr(c, field_name) + inc)

    def _count_hit(self, nbytes: int, t0: float) -> None:
        self._count(hits=1, bytes_read=nbytes, read_s=time.perf_counter() - t0)

    def _count_put(self, nbytes: int, t0: float) -> None:
        self._count(puts=1, bytes_written=nbytes, write_s=time.perf_counter() - t0)

    def _notify_evicted(self, victims: "Sequence[tuple[bytes, Blob | None]]") -> None:
        listener = self._evict_listener
        for key, blob in victims:
            self._count(evictions=1)
            if listener is not None and blob is not None:
                try:
                    listener(key, blob)
                except Exception:  # a listener bug must not break the put that evicted
                    logger.exception("evict listener failed for %s in tier %s", key.hex(), self.name)


class LocalIndexTier(Tier):
    """pin / unpin / keys for tiers that keep an in-process index of their blocks under `self._lock`
    (host, disk). Subclasses set `self._lock` and `self._pins` ({key: count}) and return their index
    (a mapping keyed by block key) from `_block_index()`."""

    _lock: "threading.Lock"
    _pins: dict[bytes, int]

    @abc.abstractmethod
    def _block_index(self) -> "dict[bytes, object]":
        """The mapping whose keys are the blocks held now (read under self._lock)."""

    def pin(self, key: bytes) -> bool:
        key = check_key(key)
        with self._lock:
            if key not in self._block_index():
                return False
            self._pins[key] = self._pins.get(key, 0) + 1
            return True

    def unpin(self, key: bytes) -> None:
        key = check_key(key)
        with self._lock:
            n = self._pins.get(key, 0)
            if n <= 1:
                self._pins.pop(key, None)
            else:
                self._pins[key] = n - 1

    def keys(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._block_index()))

