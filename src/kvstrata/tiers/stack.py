"""The tier stack: lookup order, verified loads, promote on hit, write-down through a background mover.

The stack owns policy only (kvstrata.tiers.policy); the tiers own bytes. Every load is verified
(fingerprint, key, token ids, checksums); a bad copy is removed and counted, and the next tier is
tried, so a corrupt or foreign block can cost a recompute but never a wrong answer. Writes (offers,
promotions, write-downs) go through one mover thread with a queue bounded in bytes: when it is full
the write is dropped and counted, so the engine never blocks on, or grows memory for, a cache.
Payloads are numpy arrays (a CPU engine's, no torch needed) or torch tensors; `load(numpy=True)` gives
arrays where numpy has the block's dtype.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from kvstrata.core import KvstrataError, imported
from kvstrata.tiers import codec as kvcodec
from kvstrata.tiers.base import Blob, Tier
from kvstrata.tiers.policy import TierPolicy, prefix_holders

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def _nbytes(x: Any) -> int:
    return int(x.nbytes) if isinstance(x, np.ndarray) else x.numel() * x.element_size()


def _copy_as(x: Any, numpy: bool) -> Any:
    """A copy of a queued payload, as the kind a load asked for (numpy only where numpy has its dtype)."""
    if isinstance(x, np.ndarray):
        if numpy:
            return x.copy()
        import torch

        return torch.from_numpy(x.copy())
    if numpy and x.dtype.is_floating_point and x.element_size() in (2, 4) and str(x.dtype) != "torch.bfloat16":
        return x.numpy().copy()
    return x.clone()


@dataclass
class _Job:
    kind: str  # "offer" | "promote" | "demote"
    key: bytes
    targets: list[int]
    nbytes: int
    payload: Any = None  # offers: (2, L, T, H, D), a numpy array or a CPU tensor
    token_ids: tuple[int, ...] = ()
    blob: Blob | None = None  # promotions / demotions: an encoded block


@dataclass
class _MoverStats:
    accepted: Counter = field(default_factory=Counter)  # by job kind
    inflight_hits: int = 0  # loads served from a queued offer / write-down
    dropped: Counter = field(default_factory=Counter)  # by job kind: queue full or stack closed
    dropped_bytes: int = 0
    written: Counter = field(default_factory=Counter)  # tier name -> blocks written by the mover
    write_failures: Counter = field(default_factory=Counter)  # tier name -> puts that returned False
    errors: int = 0  # exceptions inside a job (encoding, a tier bug)


class TierStack:
    """Tiers below device memory, fastest first, under one policy.

    tiers: e.g. [HostTier, DiskTier, RedisTier]; names must differ. codecs: one codec name for all
    tiers or one per tier ("raw" | "int8"). max_pending_bytes bounds the mover's queue.
    """

    def __init__(self, tiers: Sequence[Tier], fingerprint: str, codecs: str | Sequence[str] = "raw", *,
                 write_policy: str = "write-behind", max_pending_bytes: int = 256 << 20,
                 promote_on_hit: bool = True) -> None:
        self.tiers = list(tiers)
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise KvstrataError(f"tier names must differ, got {names}; pass name=... to the tiers")
        self.fingerprint = fingerprint
        codecs = [codecs] * len(self.tiers) if isinstance(codecs, str) else list(codecs)
        if len(codecs) != len(self.tiers):
            raise KvstrataError(f"{len(codecs)} codecs for {len(self.tiers)} tiers; give one per tier or one for all")
        for c in codecs:
            kvcodec.get_codec(c)
        self.codecs = codecs
        self.policy = TierPolicy(write_policy, promote_on_hit)
        self.max_pending_bytes = int(max_pending_bytes)
        self._discards: dict[str, Counter] = {n: Counter() for n in names}
        self._good_hits: Counter = Counter()
        self._load_misses = 0
        self._mover = _MoverStats()
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._inflight: dict[bytes, _Job] = {}  # offers and write-downs not yet written: still served
        self._pending_bytes = 0
        self._busy = 0
        self._closing = False
        for i, t in enumerate(self.tiers):
            if self.policy.demote_target(i, len(self.tiers)) is not None:
                t.set_evict_listener(functools.partial(self._on_evict, i))
        self._thread = threading.Thread(target=self._run, name="kv-tier-mover", daemon=True)
        self._thread.start()

    # ---- reads (caller's thread) ----

    def lookup_prefix(self, keys: Sequence[bytes]) -> list[str]:
        """Tier names holding the leading keys, fastest holder each; stops at the first key none holds.

        A hint: a block seen here may still fail to load (evicted meanwhile, or corrupt); then `load`
        returns None and the caller recomputes from that block on.
        """
        keys = list(keys)
        found: list[list[bool]] = []
        missing = list(range(len(keys)))  # indices no faster tier holds
        for tier in self.tiers:
            row = [False] * len(keys)
            if missing:
                for idx, ok in zip(missing, tier.contains_many([keys[j] for j in missing])):
                    row[idx] = ok
            found.append(row)
            missing = [j for j in missing if not row[j]]
        with self._cv:  # blocks on their way down count as held by the tier they are going to
            for j in missing:
                job = self._inflight.get(keys[j])
                if job is not None:
                    found[job.targets[0]][j] = True
        return [self.tiers[t].name for t in prefix_holders(found, len(keys))]

    def load(self, key: bytes, token_ids: Sequence[int], numpy: bool = False) -> torch.Tensor | np.ndarray | None:
        """The verified block (2, L, T, H, D) from the fastest tier with a good copy, or None; a tensor, or
        with `numpy` an array where numpy has the block's dtype.

        A copy that fails verification is removed from its tier and counted as a discard; the next
        tier is tried. A hit is promoted (in the background) to the faster tiers. A block still queued
        for writing is served from the queue.
        """
        x = self._load_inflight(key, token_ids, numpy)
        if x is not None:
            return x
        for i, tier in enumerate(self.tiers):
            blob = tier.get(key)
            if blob is None:
                continue
            try:
                x = kvcodec.decode(blob, self.fingerprint, key, token_ids, numpy=numpy)  # may alias a bytearray blob
            except kvcodec.CorruptBlockError as e:
                tier.remove(key)
                with self._cv:
                    self._discards[tier.name][e.reason] += 1
                logger.warning("discarded block %s from tier %s: %s", key.hex()[:16], tier.name, e.detail)
                continue
            with self._cv:
                self._good_hits[tier.name] += 1
            targets = self.policy.promote_targets(i)
            if targets:
                snapshot = blob if isinstance(blob, bytes) else bytes(blob)  # x may alias `blob`
                self._enqueue(_Job("promote", key, targets, len(blob), blob=snapshot))
            return x
        x = self._load_inflight(key, token_ids, numpy)  # evicted and queued for a lower tier while we looked
        if x is not None:
            return x
        with self._cv:
            self._load_misses += 1
        return None

    def _load_inflight(self, key: bytes, token_ids: Sequence[int], numpy: bool = False) -> Any:
        with self._cv:
            job = self._inflight.get(key)
        if job is None:
            return None
        if job.payload is not None:
            x = _copy_as(job.payload, numpy) if job.token_ids == tuple(int(t) for t in token_ids) else None
        else:
            assert job.blob is not None  # a write-down or demotion carries its encoded block
            try:
                x = kvcodec.decode(bytes(job.blob), self.fingerprint, key, token_ids, numpy=numpy)
            except kvcodec.CorruptBlockError:
                x = None
        if x is not None:
            with self._cv:
                self._mover.inflight_hits += 1
        return x

    # ---- writes (queued; the mover thread does them) ----

    def offer(self, key: bytes, token_ids: Sequence[int], payload: Any,
              targets: Sequence[int] | None = None) -> bool:
        """Queue a block (2, L, T, H, D) for writing down; never blocks. False if dropped (queue full).
        `targets`: tier indices to write it to (default: the policy's offer targets).

        The stack takes ownership of `payload`: the caller must not modify it afterwards.
        """
        targets = self.policy.offer_targets(len(self.tiers)) if targets is None else list(targets)
        if not targets:
            return False
        job = _Job("offer", key, targets, _nbytes(payload), payload=payload,
                   token_ids=tuple(int(t) for t in token_ids))
        return self._enqueue(job)

    def pin(self, key: bytes, tier: str) -> bool:
        return self._tier(tier).pin(key)

    def unpin(self, key: bytes, tier: str) -> None:
        self._tier(tier).unpin(key)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done; False if `timeout` seconds passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and self._busy == 0, timeout)

    def wait_written(self, keys: Sequence[bytes], timeout: float | None = None) -> bool:
        """Wait until none of `keys` has a write queued or in progress (each was written, or its write
        failed or was dropped: a later load then misses and the block is recomputed); False if `timeout`
        seconds passed first. Other blocks' writes are not waited for."""
        keys = list(keys)
        with self._cv:
            return self._cv.wait_for(lambda: not any(k in self._inflight for k in keys), timeout)

    def close(self, timeout: float | None = 10.0, *, close_tiers: bool = True) -> None:
        """Finish queued writes (up to `timeout`), stop the mover, and close the tiers."""
        if not self.flush(timeout):
            logger.warning("tier stack closing with %d writes still queued; dropping them", len(self._queue))
        with self._cv:
            self._closing = True
            self._queue.clear()
            self._inflight.clear()
            self._cv.notify_all()
        self._thread.join(timeout)
        for t in self.tiers:
            t.set_evict_listener(None)
            if close_tiers:
                t.close()

    def __enter__(self) -> "TierStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def offer_on_compute(self) -> bool:
        return self.policy.offer_on_compute

    @property
    def durable_targets(self) -> list[int]:
        """Tiers a full block is written to at once (write-behind: the durable tiers); may be empty."""
        return self.policy.durable_targets([t.durable for t in self.tiers])

    def stats(self) -> dict:
        """Per tier: blocks, bytes, hits, misses, hit rate, bytes / GB/s read and written, discards, errors."""
        per_tier = {}
        for t, c in zip(self.tiers, self.codecs):
            d = t.stats().as_dict()
            with self._cv:
                d.update(codec=c, verified_hits=self._good_hits[t.name], discards=dict(self._discards[t.name]),
                         mover_writes=self._mover.written[t.name],
                         mover_write_failures=self._mover.write_failures[t.name])
            per_tier[t.name] = d
        with self._cv:
            m = self._mover
            mover = dict(pending_bytes=self._pending_bytes, queued_jobs=len(self._queue),
                         max_pending_bytes=self.max_pending_bytes, accepted=dict(m.accepted),
                         dropped=dict(m.dropped), dropped_bytes=m.dropped_bytes, errors=m.errors,
                         inflight_hits=m.inflight_hits)
            misses = self._load_misses
        return dict(fingerprint=self.fingerprint, write_policy=self.policy.write_policy, tiers=per_tier,
                    load_misses=misses, mover=mover)

    # ---- mover ----

    def _tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KvstrataError(f"no tier named {name!r}; tiers are {[t.name for t in self.tiers]}")

    def _enqueue(self, job: _Job) -> bool:
        with self._cv:
            if self._closing or self._pending_bytes + job.nbytes > self.max_pending_bytes:
                self._mover.dropped[job.kind] += 1
                self._mover.dropped_bytes += job.nbytes
                return False
            self._queue.append(job)
            if job.kind != "promote":
                self._inflight[job.key] = job
            self._pending_bytes += job.nbytes
            self._mover.accepted[job.kind] += 1
            self._cv.notify_all()
            return True

    def _on_evict(self, tier_index: int, key: bytes, blob: Blob) -> None:
        target = self.policy.demote_target(tier_index, len(self.tiers))
        if target is not None:
            self._enqueue(_Job("demote", key, [target], len(blob), blob=blob))

    def _run(self) -> None:
        self._torch_threads_set = False
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closing)
                if self._closing and not self._queue:
                    return
                job = self._queue.popleft()
                self._busy += 1
            try:
                self._do(job)
            except Exception:  # a bug in a job must not kill the mover
                logger.exception("tier mover job %s for %s failed", job.kind, job.key.hex()[:16])
                with self._cv:
                    self._mover.errors += 1
            finally:
                with self._cv:
                    if self._inflight.get(job.key) is job:
                        del self._inflight[job.key]
                    self._pending_bytes -= job.nbytes
                    self._busy -= 1
                    self._cv.notify_all()

    def _one_torch_thread(self) -> None:
        """One OpenMP thread for any torch op on the mover thread (a bfloat16 payload's): a second team
        beside the engine's would oversubscribe the CPUs and make libgomp sleep at every barrier of
        every engine op (engine/async_engine.py). numpy payloads run no torch op here."""
        torch = imported("torch") if not getattr(self, "_torch_threads_set", True) else None
        if torch is not None:
            torch.set_num_threads(1)
            self._torch_threads_set = True

    def _do(self, job: _Job) -> None:
        self._one_torch_thread()
        encoded: dict[str, bytes] = {}
        if job.blob is not None:
            encoded[kvcodec.read_header(job.blob).codec] = bytes(job.blob)
        for i in job.targets:
            tier, codec = self.tiers[i], self.codecs[i]
            if tier.contains(job.key):
                continue
            if codec not in encoded:
                if job.payload is not None:
                    encoded[codec] = kvcodec.encode(job.payload, key=job.key, token_ids=job.token_ids,
                                                    fingerprint=self.fingerprint, codec=codec)
                else:
                    encoded[codec] = kvcodec.recode(next(iter(encoded.values())), codec)
            ok = tier.put(job.key, encoded[codec])
            with self._cv:
                (self._mover.written if ok else self._mover.write_failures)[tier.name] += 1
