"""Remote tier: blocks in a Redis or Valkey server shared by engine instances (via redis-py).

Keys are `<prefix><64 hex chars>`; the prefix (default "kvstrata:blk:") separates deployments that
share a server, and the block key itself already separates models (the fingerprint is hashed in).
Network trouble degrades to a miss, never to an exception or a stall: every socket has a timeout,
and after a connection error the tier answers at once (miss / False) for a backoff period that
doubles up to `backoff_max_s`, then tries the server again. An optional TTL expires blocks; a
`get` refreshes it (GETEX), `pin` removes it (PERSIST) until the last `unpin`. Run the server with
`maxmemory-policy volatile-lru` and a TTL, so the server's own eviction never takes pinned blocks.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar

from kvstrata.core import KvstrataError
from kvstrata.tiers.base import Blob, Tier, check_key

logger = logging.getLogger(__name__)
T = TypeVar("T")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RedisTier(Tier):
    """Blocks as Redis strings under `prefix`, optionally expiring after `ttl_s` seconds unused."""

    name = "remote"
    durable = True

    def __init__(self, url: str, *, prefix: str = "kvstrata:blk:", ttl_s: int | None = None,
                 socket_timeout_s: float = 2.0, connect_timeout_s: float = 1.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0, name: str = "remote") -> None:
        import redis  # heavy optional import stays here
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.name = name
        super().__init__()
        if ttl_s is not None and ttl_s <= 0:
            raise KvstrataError(f"remote tier TTL must be > 0 seconds (or None), got {ttl_s}")
        self.url, self.prefix, self.ttl_s = url, prefix, ttl_s
        try:
            self._client = redis.Redis.from_url(
                url, socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
                retry=Retry(NoBackoff(), 1),  # one immediate retry re-dials a connection the server dropped
                health_check_interval=0)
        except ValueError as e:
            raise KvstrataError(f"bad Redis URL {url!r}: {e}; use redis://host:port/db") from e
        self._redis_errors = (redis.exceptions.RedisError, OSError)
        self._conn_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._backoff_initial, self._backoff_max = backoff_initial_s, backoff_max_s
        self._backoff = backoff_initial_s
        self._down_until = 0.0
        self._state_lock = threading.Lock()
        self._pins: dict[bytes, int] = {}
        self._has_getex = True

    # ---- plumbing ----

    def rkey(self, key: bytes) -> str:
        return self.prefix + key.hex()

    @property
    def available(self) -> bool:
        """False while backing off after a connection error."""
        return time.monotonic() >= self._down_until

    def ping(self) -> bool:
        """Ask the server now (ignores the backoff); True if it answers."""
        try:
            ok = bool(self._client.ping())
        except self._redis_errors:
            return False
        self._up()
        return ok

    def _call(self, fn: Callable[[Any], T], default: T) -> T:
        if not self.available:
            return default
        try:
            result = fn(self._client)
        except self._conn_errors as e:
            self._down(e)
            return default
        except self._redis_errors as e:  # e.g. OOM under maxmemory: this call fails, the server is up
            logger.warning("remote tier %s: %s", self.url, e)
            self._count(errors=1)
            return default
        self._up()
        return result

    def _down(self, e: BaseException) -> None:
        self._count(errors=1)
        with self._state_lock:
            first = self._backoff == self._backoff_initial
            self._down_until = time.monotonic() + self._backoff
            wait, self._backoff = self._backoff, min(self._backoff * 2, self._backoff_max)
        try:
            self._client.connection_pool.disconnect()  # drop sockets to the dead server
        except Exception:
            pass
        (logger.warning if first else logger.debug)(
            "remote tier %s unreachable (%s); answering misses for %.1fs", self.url, e, wait)

    def _up(self) -> None:
        if self._backoff != self._backoff_initial:
            with self._state_lock:
                self._backoff, self._down_until = self._backoff_initial, 0.0
            logger.warning("remote tier %s is reachable again", self.url)

    def _ex(self, key: bytes) -> int | None:
        return None if (self.ttl_s is None or self._pins.get(key)) else self.ttl_s

    def _get_cmd(self, r: object, key: bytes) -> object:
        ex = self._ex(key)
        if ex is not None and self._has_getex:
            return r.getex(self.rkey(key), ex=ex)  # type: ignore[attr-defined]
        return r.get(self.rkey(key))  # type: ignore[attr-defined]

    # ---- contract ----

    def contains(self, key: bytes) -> bool:
        key = check_key(key)
        return bool(self._call(lambda r: r.exists(self.rkey(key)), 0))

    def get(self, key: bytes) -> Blob | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[Blob | None]:
        keys = [check_key(k) for k in keys]
        t0 = time.perf_counter()

        def run(r: object) -> list:
            pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
            for k in keys:
                self._get_cmd(pipe, k)
            return pipe.execute(raise_on_error=False)

        blobs: list[Any] = self._call(run, [None] * len(keys))
        errors = [b for b in blobs if isinstance(b, Exception)]
        if errors and self._has_getex and "unknown command" in str(errors[0]).lower():
            self._has_getex = False  # a server older than 6.2: plain GET, TTL not refreshed on read
            return self.get_many(keys)
        if errors:
            logger.warning("remote tier %s: %s", self.url, errors[0])
            self._count(errors=len(errors))
            blobs = [None if isinstance(b, Exception) else b for b in blobs]
        hits = [b for b in blobs if b is not None]
        if hits:
            self._count(hits=len(hits), bytes_read=sum(len(b) for b in hits), read_s=time.perf_counter() - t0)
        self._count(misses=len(keys) - len(hits))
        return list(blobs)

    def peek(self, key: bytes, nbytes: int | None = None) -> bytes | None:
        name = self.rkey(check_key(key))  # GET / GETRANGE leave the TTL alone
        if nbytes is None:
            return self._call(lambda r: r.get(name), None)
        data = self._call(lambda r: r.getrange(name, 0, nbytes - 1), None)
        return data or None

    def put(self, key: bytes, blob: bytes | bytearray | memoryview) -> bool:
        return self.put_many([(key, blob)])[0]

    def put_many(self, items) -> list[bool]:  # type: ignore[override]
        items = [(check_key(k), b) for k, b in items]
        t0 = time.perf_counter()

        def run(r: object) -> list:
            pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
            for k, b in items:
                pipe.set(self.rkey(k), bytes(b) if isinstance(b, memoryview) else b, ex=self._ex(k))
            return pipe.execute(raise_on_error=False)

        results = self._call(run, [False] * len(items))
        done = [x is True for x in results]
        if any(isinstance(x, Exception) for x in results):  # e.g. OOM under maxmemory
            logger.warning("remote tier %s: %s", self.url, next(x for x in results if isinstance(x, Exception)))
            self._count(errors=1)
        ok = sum(done)
        if ok:
            nbytes = sum(len(b) for (_, b), d in zip(items, done) if d)
            self._count(puts=ok, bytes_written=nbytes, write_s=time.perf_counter() - t0)
        if ok < len(items):
            self._count(put_failures=len(items) - ok)
        return done

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        keys = [check_key(k) for k in keys]

        def run(r: object) -> list:
            pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
            for k in keys:
                pipe.exists(self.rkey(k))
            return pipe.execute()

        return [bool(x) for x in self._call(run, [0] * len(keys))]

    def remove(self, key: bytes) -> None:
        key = check_key(key)
        with self._state_lock:
            self._pins.pop(key, None)
        self._call(lambda r: r.delete(self.rkey(key)), 0)

    def pin(self, key: bytes) -> bool:
        key = check_key(key)

        def run(r: object) -> bool:
            pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
            pipe.exists(self.rkey(key))
            pipe.persist(self.rkey(key))
            return bool(pipe.execute()[0])

        if not self._call(run, False):
            return False
        with self._state_lock:
            self._pins[key] = self._pins.get(key, 0) + 1
        return True

    def unpin(self, key: bytes) -> None:
        key = check_key(key)
        with self._state_lock:
            n = self._pins.get(key, 0)
            if n > 1:
                self._pins[key] = n - 1
                return
            self._pins.pop(key, None)
            if n == 0:
                return
        if self.ttl_s is not None:
            self._call(lambda r: r.expire(self.rkey(key), self.ttl_s), 0)

    def keys(self) -> Iterator[bytes]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        names: list[bytes] = self._call(lambda r: list(r.scan_iter(match=pattern, count=1000)), [])
        out = []
        for n in names:
            h = n[len(self.prefix):].decode(errors="replace") if isinstance(n, bytes) else n[len(self.prefix):]
            if _HEX64.match(h):
                out.append(bytes.fromhex(h))
        return iter(out)

    def scan_usage(self) -> tuple[int, int]:
        """(blocks, bytes) under this prefix, by a full SCAN + STRLEN: for the CLI, not the hot path."""
        keys = list(self.keys())

        def run(r: object) -> list:
            pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
            for k in keys:
                pipe.strlen(self.rkey(k))
            return pipe.execute()

        sizes: list[int] = self._call(run, [])
        return len(sizes), int(sum(sizes))

    def _usage(self) -> tuple[int | None, int | None, int | None, int]:
        with self._state_lock:
            pinned = len(self._pins)
        return None, None, None, pinned  # shared server: unknown without a scan (see scan_usage)

    def close(self) -> None:
        super().close()
        try:
            self._client.close()
        except Exception:
            pass
