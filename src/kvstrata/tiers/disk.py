"""Disk tier: one file per block in a directory on local SSD, written atomically, LRU-ish under a budget.

Layout: `<root>/<first two hex chars of the key>/<64 hex chars>.kvb`. A block is written to a temporary
file in the same shard directory (`.<hex>.<random>.tmp`), fsynced, then renamed over its final name
(os.replace), so a crash leaves either the whole block or no block, never a partial file under a block
name. At start the index is rebuilt from the files (oldest mtime first: a hit touches the file's
mtime, at most once per TOUCH_AFTER_S, so recency survives restarts) and stray temporary files are
removed. One engine process per directory: the index lives in memory (engines share blocks through
the remote tier).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

from kvstrata.core import KvstrataError
from kvstrata.tiers.base import LocalIndexTier, check_key

logger = logging.getLogger(__name__)

SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
TOUCH_AFTER_S = 1.0  # a hit refreshes the file's mtime when it is older than this
_BLOCK_NAME = re.compile(r"^[0-9a-f]{64}\.kvb$")


class DiskTier(LocalIndexTier):
    """Blocks as files under `root`, at most `capacity_bytes` of them (None: no budget).

    `fsync=False` skips the fsync before the rename (faster, still never partial: the rename is
    atomic; a power cut may then lose recent blocks, which is harmless for a cache).
    """

    name = "disk"
    durable = True

    def __init__(self, root: str | os.PathLike, capacity_bytes: int | None = None, *, fsync: bool = True,
                 name: str = "disk") -> None:
        self.name = name
        super().__init__()
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise KvstrataError(f"disk tier capacity must be > 0 bytes (or None), got {capacity_bytes}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KvstrataError(f"cannot create the KV disk directory {self.root}: {e}; choose a writable path") from e
        if not self.root.is_dir():
            raise KvstrataError(f"KV disk path {self.root} is not a directory; choose a directory")
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size; least recently used first
        self._reserved: dict[bytes, int] = {}  # keys being written -> size (counted in _used)
        self._pins: dict[bytes, int] = {}
        self._used = 0
        self._failures_logged = 0
        self._rebuild_index()

    # ---- files ----

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / (h + SUFFIX)

    def _rebuild_index(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        removed = 0
        for shard in self.root.iterdir():
            if not (shard.is_dir() and len(shard.name) == 2):
                continue
            for entry in os.scandir(shard):
                if entry.name.endswith(TMP_SUFFIX):  # left by a writer that died before its rename
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except OSError as e:
                        logger.warning("cannot remove stray temp file %s: %s", entry.path, e)
                elif _BLOCK_NAME.match(entry.name) and entry.name.startswith(shard.name):
                    st = entry.stat()
                    found.append((st.st_mtime, bytes.fromhex(entry.name[:64]), st.st_size))
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        logger.info("disk tier %s: %d blocks, %d bytes; %d stray temp files removed",
                    self.root, len(self._index), self._used, removed)

    def _read(self, path: Path, nbytes: int | None = None, touch: bool = False) -> bytearray:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            size = st.st_size if nbytes is None else min(st.st_size, nbytes)
            buf = bytearray(size)
            n = f.readinto(buf)
            if n != size:
                raise OSError(f"short read {n} of {size}")
            if touch and time.time() - st.st_mtime > TOUCH_AFTER_S:
                try:  # recency for the index rebuilt at the next start; coarse, to spare metadata writes
                    os.utime(f.fileno())
                except OSError:
                    pass
        return buf

    def _write_atomic(self, path: Path, blob: bytes | bytearray | memoryview) -> None:
        path.parent.mkdir(exist_ok=True)
        tmp = path.parent / f".{path.stem}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                mv = memoryview(blob).cast("B")
                while mv:
                    mv = mv[os.write(fd, mv):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # ---- contract ----

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return check_key(key) in self._index

    def get(self, key: bytes) -> bytearray | None:
        t0 = time.perf_counter()
        key = check_key(key)
        with self._lock:
            present = key in self._index
            if present:
                self._index.move_to_end(key)
        if not present:
            self._count(misses=1)
            return None
        path = self.path(key)
        try:
            blob = self._read(path, touch=True)
        except FileNotFoundError:  # removed behind our back (cache clear, another tool)
            self._forget(key)
            self._count(misses=1)
            return None
        except OSError as e:
            logger.warning("disk tier read of %s failed: %s", path, e)
            self._count(misses=1, errors=1)
            return None
        self._count_hit(len(blob), t0)
        return blob

    def peek(self, key: bytes, nbytes: int | None = None) -> bytearray | None:
        try:
            return self._read(self.path(check_key(key)), nbytes)
        except OSError:
            return None

    def put(self, key: bytes, blob: bytes | bytearray | memoryview) -> bool:
        t0 = time.perf_counter()
        key, size = check_key(key), len(blob)
        with self._lock:
            if key in self._index or key in self._reserved:
                if key in self._index:
                    self._index.move_to_end(key)
                return True
            victims = self._make_room(size)
            if victims is None:
                self._count(put_failures=1)
                return False
            for k in victims:
                self._used -= self._index.pop(k)
            self._reserved[key] = size
            self._used += size
        self._evict_files(victims)
        try:
            self._write_atomic(self.path(key), blob)
        except OSError as e:  # disk full, read-only, permissions: the engine carries on without it
            with self._lock:
                self._used -= self._reserved.pop(key)
            self._count(put_failures=1, errors=1)
            self._failures_logged += 1
            if self._failures_logged in (1, 10, 100) or self._failures_logged % 1000 == 0:
                logger.warning("disk tier %s: put failed (%d so far): %s", self.root, self._failures_logged, e)
            return False
        with self._lock:
            self._reserved.pop(key)
            self._index[key] = size
        self._count_put(size, t0)
        return True

    def _make_room(self, size: int) -> list[bytes] | None:
        """LRU unpinned keys whose removal lets `size` more bytes fit; None if impossible. Lock held."""
        if self.capacity_bytes is None:
            return []
        if size > self.capacity_bytes:
            return None
        need = self._used + size - self.capacity_bytes
        victims: list[bytes] = []
        for k, s in self._index.items():
            if need <= 0:
                break
            if self._pins.get(k):
                continue
            victims.append(k)
            need -= s
        return victims if need <= 0 else None

    def _evict_files(self, victims: list[bytes]) -> None:
        if not victims:
            return
        listener = self._evict_listener
        out: list[tuple[bytes, bytes | None]] = []
        for k in victims:
            p = self.path(k)
            blob = None
            if listener is not None:
                try:
                    blob = self._read(p)
                except OSError:
                    pass
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("disk tier could not delete evicted %s: %s", p, e)
                self._count(errors=1)
            out.append((k, blob))
        self._notify_evicted(out)

    def _forget(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
            self._pins.pop(key, None)

    def remove(self, key: bytes) -> None:
        key = check_key(key)
        self._forget(key)
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("disk tier could not delete %s: %s", self.path(key), e)
            self._count(errors=1)

    def _block_index(self) -> dict:
        return self._index

    def _usage(self) -> tuple[int | None, int | None, int | None, int]:
        with self._lock:
            return len(self._index), self._used, self.capacity_bytes, len(self._pins)
