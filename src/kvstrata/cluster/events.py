"""KV events: what each replica's device pool stores and removes, in vLLM's event schema, over Redis.

The schema is vLLM's (`vllm/distributed/kv_events.py`): a `KVEventBatch` `[ts, events]` whose events
are tagged arrays, msgpack-encoded as msgspec encodes vLLM's `array_like=True, tag=True` structs
(trailing fields at their defaults omitted):

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]

Block hashes are kvstrata's 32-byte chain keys (`core.block_key`: parent key, token ids and the model
fingerprint), sent as bytes, as vLLM sends its sha256 hashes. `medium` is "GPU" for the device pool,
vLLM's name for it, whatever the device is. So a router that consumes vLLM's events (Dynamo, llm-d's
KV-cache manager, the SGLang gateway) can consume these too: with the token ids it can also hash
blocks its own way.

Transport: a Redis stream (`XADD <prefix>kv-events MAXLEN ~ N`, fields `replica` and `batch`). The
cluster already needs one shared Redis for its KV tier, so nothing new runs; the stream is ordered,
its entry ids are the sequence numbers vLLM's ZMQ publisher adds by hand, a consumer that starts late
reads back the retained window (vLLM needs a separate replay socket for that), and any Redis client on
any machine can subscribe. Pub/sub would lose every event sent while a consumer was down; a Ray actor
would tie the consumers to Ray.

The publisher is a `kv.manager.BlockListener` plus a pool evict hook: it queues events on the engine
thread (a list append) and a background thread ships them in batches; a Redis error drops that batch
and is counted (events are routing hints: a stale index costs a cache miss, never a wrong block,
since every block is verified where it is used).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

log = logging.getLogger(__name__)

MEDIUM_DEVICE = "GPU"  # vLLM's name for the pool attention reads
STREAM_SUFFIX = "kv-events"


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_DEVICE
    lora_name: str | None = None

    def wire(self) -> list:
        return ["BlockStored", list(self.block_hashes), self.parent_block_hash, list(self.token_ids), self.block_size,
                self.lora_id, self.medium, self.lora_name]


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[bytes]
    medium: str | None = MEDIUM_DEVICE

    def wire(self) -> list:
        return ["BlockRemoved", list(self.block_hashes), self.medium]


@dataclass(frozen=True)
class AllBlocksCleared:
    def wire(self) -> list:
        return ["AllBlocksCleared"]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_batch(ts: float, events: Sequence[KVEvent]) -> bytes:
    """msgpack bytes of a KVEventBatch, as vLLM's publisher sends them (data_parallel_rank omitted)."""
    import msgpack

    return msgpack.packb([ts, [e.wire() for e in events]], use_bin_type=True)


def decode_batch(data: bytes) -> tuple[float, list[KVEvent]]:
    """The inverse of encode_batch; also reads vLLM's own batches (unknown trailing fields ignored,
    integer block hashes kept as ints). Raises ValueError on anything else."""
    import msgpack

    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
        ts, items = float(raw[0]), raw[1]
        events: list[KVEvent] = []
        for it in items:
            tag = it[0]
            if tag == "BlockStored":
                f = list(it[1:]) + [None] * 7
                events.append(BlockStored(list(f[0]), f[1], list(f[2]), int(f[3]), f[4], f[5], f[6]))
            elif tag == "BlockRemoved":
                events.append(BlockRemoved(list(it[1]), it[2] if len(it) > 2 else None))
            elif tag == "AllBlocksCleared":
                events.append(AllBlocksCleared())
            else:
                raise ValueError(f"unknown KV event tag {tag!r}")
        return ts, events
    except (TypeError, IndexError, KeyError, ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"not a KV event batch: {e}") from None


class KVEventPublisher:
    """One replica's events to the stream. `stored` / `removed` / `on_evict` run on the engine thread
    and only append; `run` (a daemon thread) sends a batch every `flush_s` when there is one."""

    def __init__(self, redis_url: str, prefix: str, replica_id: str, block_size: int, *, flush_s: float = 0.02,
                 maxlen: int = 200_000) -> None:
        import redis

        self.r = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1)
        self.stream, self.replica_id, self.block_size = prefix + STREAM_SUFFIX, replica_id, block_size
        self.flush_s, self.maxlen = flush_s, maxlen
        self._pending: list[KVEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.counters = {"batches": 0, "events": 0, "batches_dropped": 0}
        self._pending.append(AllBlocksCleared())  # a new pool is empty, whatever was said before
        self._thread = threading.Thread(target=self._run, name="kvstrata-kv-events", daemon=True)
        self._thread.start()

    # -- the engine thread (kv.manager.BlockListener and a pool evict hook) ------------------------
    def stored(self, keys: Sequence[bytes], parent: bytes | None, token_ids: Sequence[int]) -> None:
        self._add(BlockStored(list(keys), parent, list(token_ids), self.block_size))

    def removed(self, keys: Sequence[bytes]) -> None:
        self._add(BlockRemoved(list(keys)))

    def on_evict(self, b: int, key: bytes, token_ids: Any) -> None:
        self._add(BlockRemoved([key]))

    def _add(self, ev: KVEvent) -> None:
        with self._lock:
            self._pending.append(ev)

    # -- the sender ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()
        self.flush()

    def flush(self) -> bool:
        with self._lock:
            events, self._pending = self._pending, []
        if not events:
            return True
        try:
            self.r.xadd(self.stream, {"replica": self.replica_id, "batch": encode_batch(time.time(), events)},
                        maxlen=self.maxlen, approximate=True)
            self.counters["batches"] += 1
            self.counters["events"] += len(events)
            return True
        except Exception as e:  # noqa: BLE001 - Redis down: routing loses hints, nothing else
            self.counters["batches_dropped"] += 1
            if self.counters["batches_dropped"] in (1, 10, 100) or self.counters["batches_dropped"] % 1000 == 0:
                log.warning("KV events: could not publish %d events (%s); %d batches dropped so far", len(events), e,
                            self.counters["batches_dropped"])
            return False

    def close(self, clear: bool = True) -> None:
        """Stop the sender; with `clear`, say the pool is gone (a graceful replica shutdown)."""
        if clear:
            self._add(AllBlocksCleared())
        self._stop.set()
        self._thread.join(5)
        self.r.close()
