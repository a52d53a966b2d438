"""The cluster's view of which replica holds which KV block, built from the replicas' KV events.

`KVIndex.match(chain_keys)` answers, per replica, how many leading blocks of a prompt it holds in its
device pool: the longest cached prefix the router prefers. `KVIndexFollower` keeps an index current by
reading the event stream (cluster/events.py) on a daemon thread, from the start of the retained
window, so an ingress that starts late (or restarts) learns what the replicas already hold.

The index is a hint. It can be behind (events in flight) or stale (a replica SIGKILLed before it
said AllBlocksCleared; the router only considers live replicas); a wrong hint costs a cache miss or a
load from a tier, never a wrong block, since the engine verifies every block it uses.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable, Sequence

from kvstrata.cluster.events import STREAM_SUFFIX, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, decode_batch

log = logging.getLogger(__name__)


class KVIndex:
    def __init__(self) -> None:
        self._holders: dict[bytes, set[str]] = {}  # block hash -> replicas holding it in device memory
        self._blocks: dict[str, set[bytes]] = {}  # replica -> its block hashes
        self._lock = threading.Lock()
        self.events_applied = 0

    def apply(self, replica: str, events: Iterable[KVEvent]) -> None:
        with self._lock:
            mine = self._blocks.setdefault(replica, set())
            for ev in events:
                self.events_applied += 1
                if isinstance(ev, BlockStored):
                    if ev.medium not in (None, "GPU"):
                        continue
                    for h in ev.block_hashes:
                        if h not in mine:
                            mine.add(h)
                            self._holders.setdefault(h, set()).add(replica)
                elif isinstance(ev, BlockRemoved):
                    if ev.medium not in (None, "GPU"):
                        continue
                    for h in ev.block_hashes:
                        self._drop(replica, h, mine)
                elif isinstance(ev, AllBlocksCleared):
                    for h in list(mine):
                        self._drop(replica, h, mine)

    def _drop(self, replica: str, h: bytes, mine: set[bytes]) -> None:
        mine.discard(h)
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[h]

    def match(self, keys: Sequence[bytes], replicas: Iterable[str] | None = None) -> dict[str, int]:
        """Leading blocks of `keys` each replica holds (replicas holding none are left out)."""
        out: dict[str, int] = {}
        with self._lock:
            alive = set(self._holders.get(keys[0], ())) if keys else set()
            if replicas is not None:
                alive &= set(replicas)
            for i, k in enumerate(keys):
                if not alive:
                    break
                here = self._holders.get(k, set())
                for r in list(alive):
                    if r in here:
                        out[r] = i + 1
                    else:
                        alive.discard(r)
        return out

    def blocks(self, replica: str) -> int:
        with self._lock:
            return len(self._blocks.get(replica, ()))

    def replicas(self) -> list[str]:
        with self._lock:
            return [r for r, b in self._blocks.items() if b]

    def forget(self, replica: str) -> None:
        self.apply(replica, [AllBlocksCleared()])
        with self._lock:
            self._blocks.pop(replica, None)


class KVIndexFollower:
    """Reads `<prefix>kv-events` into a KVIndex on a daemon thread (XREAD, blocking up to 1 s a call)."""

    def __init__(self, redis_url: str, prefix: str, index: KVIndex | None = None) -> None:
        import redis

        self.index = index or KVIndex()
        self.r = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=1)
        self.stream = prefix + STREAM_SUFFIX
        self.last_id = "0"  # from the start of the retained window
        self.bad_batches = 0
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstrata-kv-index", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import redis

        backoff = 0.5
        while not self._stop.is_set():
            try:
                resp = self.r.xread({self.stream: self.last_id}, count=512, block=1000)
                backoff = 0.5
            except redis.RedisError as e:
                if self._stop.is_set():
                    return
                log.warning("KV index: cannot read %s (%s); retrying in %.1fs", self.stream, e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not resp:
                self._caught_up.set()
                continue
            for _, entries in resp:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    self._apply(fields)

    def _apply(self, fields: dict) -> None:
        replica = fields.get(b"replica", b"").decode()
        try:
            _, events = decode_batch(fields.get(b"batch", b""))
        except ValueError as e:
            self.bad_batches += 1
            log.warning("KV index: skipping a bad batch from %r: %s", replica, e)
            return
        self.index.apply(replica, events)

    def wait_caught_up(self, timeout: float) -> bool:
        """True once a read found nothing new (the retained window has been applied)."""
        return self._caught_up.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(3)
        self.r.close()
