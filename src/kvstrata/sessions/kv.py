"""SessionKV: the one owner of a durable session's KV between its turns.

A session's KV is content-addressed (the chain keys of its token ids), so where it lives is a property
of its token prefix: the device pool, the host / disk / remote tiers. Turns run through
sessions/turns.py; between them the session is in one of these places, and only this object moves it:

    pause(tool)          the session waits on a tool call: the cost model (sched/placement.py) keeps the
                         KV in device memory (a hold: its blocks cannot be evicted), moves it to a tier
                         (written now, pinned for about the expected wait, device copies freed) or drops
                         it (no hold: its blocks stay cached until the LRU needs them, and whatever was
                         evicted is recomputed, or loaded from a durable copy, on the next turn)
    park(tier, lease_s)  explicitly: written to `tier` and pinned there until the lease ends
    resume               undo a pause or park: release the hold or unpin, prefetch into device memory,
                         learn how long the tool took
    prefetch / locate    load the stored prefix into device memory / where each part of it is now
    fork                 a new session sharing the prefix (and so, by content, its KV)
    warm                 the session's token ids were replaced (compaction): release what it held for the
                         old prefix, compute the new prefix's KV once so the next turn finds it cached
    close                release everything; the session takes no more turns
    sweep_leases         unpin the KV of sessions whose lease ended (they stay parked)

Two timers refine a pause (EngineConfig.pause_ttl, .prefetch_ahead; both on by default):
- keep with a TTL (as Continuum does): KV kept in device memory is kept only for the break-even time
  at which keeping it has cost what moving it down (or dropping it) costs; a wait that outlasts it
  (the tool was slower than expected) moves the KV down then, instead of holding memory to the end.
- prefetch ahead: KV moved to a tier is loaded back shortly before the tool's expected return (its
  expected wait minus twice the reload time), so the next turn finds it in device memory.
    park_all             at a graceful shutdown, park the sessions this process served

Agent programs without a stored session get the same pause between their requests, in this process only
(sessions/programs.py, a part of this class; EngineConfig.program_pause).

Contract:
- Every placement is written to the session store (`kv_placement`, `parked_tier`, `lease_expires_at`)
  after the engine carried it out, so it survives a restart: a resume after a restart finds the tier
  the KV went to and prefetches from it. Holds and pins live in this process only.
- Engine work runs on the engine thread (AsyncEngine.call_async), one call per method; the holds dict is
  touched only there.
- Moving KV is an optimisation: a tier that fails costs a recompute, never the turn (logged). A park whose
  writes fail is reported as not moved and does not mark the session parked. Store errors raise.
- Methods take the caller's Session (as read from the store) and update it to what the store now holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kvstrata.core import KvstrataError, SamplingParams
from kvstrata.sessions.stats import SessionStats
from kvstrata.sessions.store import SessionStore
from kvstrata.sessions.programs import PROGRAM_PREFIX, PausedBranch, ProgramPauses
from kvstrata.sessions.turns import sync
from kvstrata.sessions.types import ANY_OWNER, Owner, Session, SessionInfo, SessionState

log = logging.getLogger(__name__)

PAUSE_LEASE_FACTOR = 4.0  # a paused session's tier pin lasts this many expected waits ...
PAUSE_LEASE_MIN_S = 60.0  # ... and at least this long
TTL_BOUNDS_S = (0.5, 3600.0)  # a keep's TTL is clamped to this range


class SessionKV(ProgramPauses):
    def __init__(self, aengine: Any, store: SessionStore) -> None:
        self.aeng, self.store = aengine, store
        self._holds: dict[str, list[int]] = {}  # session id -> device blocks held for it (engine thread)
        self._timers: dict[str, asyncio.Task] = {}  # session id -> its TTL expiry or prefetch-ahead task
        self._moved: dict[str, str] = {}  # session id -> tier its KV went to when a keep's TTL ended
        self.stats = SessionStats()  # per session: tokens computed / restored, bytes moved, time parked
        self._init_programs()
        self.counters = {"pauses": 0, "parks": 0, "resumes": 0, "prefetched_tokens": 0, "park_failures": 0,
                         "ttl_expiries": 0, "prefetched_ahead_tokens": 0, "program_pauses": 0, "program_resumes": 0}

    async def _engine(self, fn) -> Any:
        return await self.aeng.call_async(fn)

    async def _db(self, fn, *a, **kw) -> Any:
        return await asyncio.to_thread(fn, *a, **kw)

    # -- engine-thread halves ---------------------------------------------------------------------
    def _release(self, e, sid: str) -> None:
        blocks = self._holds.pop(sid, None)
        if blocks:
            e.kv.release(blocks)

    def _pause_now(self, e, sid: str, ids: list[int], tool: str | None, wait_s: float | None) -> dict:
        session = not sid.startswith(PROGRAM_PREFIX)  # a stored session's tier copy is pinned and accounted
        self._release(e, sid)  # a second pause replaces the first
        bs, pool = e.pool.block_size, e.pool
        nblocks = len(ids) // bs
        if nblocks == 0:
            return {"action": "none", "reason": "shorter than one block", "tokens": 0, "expected_wait_s": 0.0}
        d = e.placement.decide(pool.block_bytes * nblocks, nblocks * bs, tool, pool.num_in_use / pool.num_blocks,
                               pool.block_bytes * pool.num_blocks, wait_s).as_dict()
        if d["action"] == "keep":
            self._holds[sid] = e.kv.hold(ids)
        elif d["action"] != "drop":  # (a drop holds nothing: freeing blocks nobody needs yet gains nothing)
            res = e.offload.park(ids, d["action"], pin=session)
            if session:
                self.stats.moved_down(sid, (res["blocks_written"] + res["blocks_already_there"]) * pool.block_bytes)
            if res["failed"]:
                log.warning("session %s: pausing to %s wrote %d of %d blocks; the rest will be recomputed",
                            sid, d["action"], res["blocks_written"] + res["blocks_already_there"], nblocks)
            d["tokens_stored"] = res["tokens"]
        return d

    def _resume_now(self, e, sid: str, ids: list[int], placement: dict | None, tier: str | None,
                    prefetch: bool) -> int:
        self._release(e, sid)
        tier = tier or self._moved.pop(sid, None)
        if tier and e.offload is not None and tier in e.offload.tier_names:
            e.offload.unpin(ids, tier)
        if placement is not None and placement.get("tool") is not None and placement.get("at"):
            e.placement.waits.observe(placement["tool"], max(0.0, time.time() - float(placement["at"])))
        if not prefetch or e.offload is None or (placement or {}).get("action") == "drop":
            return 0
        return e.offload.prefetch(ids)

    def _park_now(self, e, sid: str, ids: list[int], tier: str) -> dict:
        if e.offload is None:
            raise KvstrataError("no KV tier is configured; start the engine with --kv-host-bytes, --kv-disk-dir "
                                "or --kv-redis-url")
        self._release(e, sid)
        res = e.offload.park(ids, tier, pin=True)
        if not res["failed"]:
            self.stats.moved_down(sid, (res["blocks_written"] + res["blocks_already_there"]) * e.pool.block_bytes)
        if res["failed"]:  # not parked: undo the pins this park put on the blocks that did get there
            e.offload.unpin(ids[: res["tokens"]], tier)
        return res

    # -- the lifecycle ----------------------------------------------------------------------------
    async def pause(self, sess: Session, owner: Owner = ANY_OWNER, tool: str | None = None,
                    wait_s: float | None = None) -> dict:
        """The session waits (on `tool`, expected `wait_s` or the learned wait): keep / move down / drop.
        Returns the decision (action, costs, expected wait); the placement is recorded in the store."""
        sid, ids = sess.id, list(sess.token_ids)
        self._cancel_timer(sid)
        d = await self._engine(lambda e: self._pause_now(e, sid, ids, tool, wait_s))
        if d["action"] == "none":
            return d
        self.counters["pauses"] += 1
        tier = d["action"] if d["action"] not in ("keep", "drop") else None
        placement = {"action": d["action"], "tier": tier, "tokens": d.get("tokens", 0), "at": time.time(),
                     "expected_wait_s": d["expected_wait_s"], "tool": tool}
        lease = time.time() + max(PAUSE_LEASE_MIN_S, PAUSE_LEASE_FACTOR * d["expected_wait_s"]) if tier else None
        info = await self._db(self.store.set_lease, sid, owner=owner, lease_expires_at=lease, parked_tier=tier,
                              kv_placement=placement, expected_version=sess.version)
        sync(sess, info)
        self._arm(sess, owner, d)
        return d

    # -- timers: keep with a TTL, prefetch ahead --------------------------------------------------
    def _cancel_timer(self, sid: str) -> None:
        t = self._timers.pop(sid, None)
        if t is not None and t is not asyncio.current_task():
            t.cancel()

    def _arm(self, sess: Session | PausedBranch, owner: Owner, d: dict) -> None:
        cfg = self.aeng.engine.config
        costs = d.get("costs") or {}
        if d["action"] == "keep" and cfg.pause_ttl:
            others = {k: v for k, v in costs.items() if k != "keep"}
            rate = costs.get("keep", 0.0) / max(d["expected_wait_s"], 1e-9)  # keep's cost per second of wait
            if others and rate > 0:
                move = min(others, key=others.__getitem__)
                ttl = min(max(others[move] / rate, TTL_BOUNDS_S[0]), TTL_BOUNDS_S[1])
                self._timers[sess.id] = asyncio.ensure_future(self._expire(sess, owner, move, ttl))
        elif d["action"] not in ("keep", "drop") and cfg.prefetch_ahead:
            reload_s = costs.get(d["action"], 0.0)
            delay = d["expected_wait_s"] - 2 * reload_s
            if delay > 0:
                self._timers[sess.id] = asyncio.ensure_future(self._prefetch_later(sess.id, list(sess.token_ids), delay))

    async def _expire(self, sess: Session | PausedBranch, owner: Owner, move: str, ttl: float) -> None:
        """The wait outlasted the keep's break-even time: release the hold and move the KV down. The
        store is not written (the session's writers own its version): the tier is remembered here for
        the resume's unpin, and after a restart the durable copy (write-behind) serves the resume."""
        await asyncio.sleep(ttl)
        sid, ids = sess.id, list(sess.token_ids)

        def now(e) -> dict:
            if sid not in self._holds:
                return {}
            self._release(e, sid)
            if move == "drop" or e.offload is None:
                return {}
            if sid.startswith(PROGRAM_PREFIX):
                return e.offload.park(ids, move, pin=False)
            self._moved[sid] = move
            return e.offload.park(ids, move, pin=True)

        try:
            res = await self._engine(now)
            self.counters["ttl_expiries"] += 1
            log.debug("session %s: TTL %.1fs ended, KV -> %s (%s)", sid, ttl, move, res)
        except Exception as e:  # noqa: BLE001 - an optimisation: the hold is released either way
            log.info("session %s: moving the KV down after its TTL failed (%s)", sid, e)
        finally:
            if self._timers.get(sid) is asyncio.current_task():
                del self._timers[sid]

    async def _prefetch_later(self, sid: str, ids: list[int], delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            n = await self._engine(lambda e: e.offload.prefetch(ids) if e.offload is not None else 0)
            self.counters["prefetched_ahead_tokens"] += n
        except Exception as e:  # noqa: BLE001 - an optimisation: the resume loads what is missing
            log.info("session %s: prefetch ahead failed (%s)", sid, e)
        finally:
            if self._timers.get(sid) is asyncio.current_task():
                del self._timers[sid]

    async def resume(self, sess: Session, owner: Owner = ANY_OWNER, *, prefetch: bool = True) -> int:
        """Undo a pause or park (no-op when there is none): release the hold or unpin, prefetch the KV
        into device memory (not after a drop), clear the placement; a PARKED session becomes ACTIVE.
        Returns the tokens prefetched."""
        if sess.kv_placement is None and sess.parked_tier is None and sess.state != SessionState.PARKED \
                and sess.id not in self._holds and sess.id not in self._moved:
            return 0
        sid, ids, placement, tier = sess.id, list(sess.token_ids), sess.kv_placement, sess.parked_tier
        self._cancel_timer(sid)
        t0 = time.perf_counter()
        try:
            loaded = await self._engine(lambda e: self._resume_now(e, sid, ids, placement, tier, prefetch))
        except KvstrataError as e:  # a tier gone from this configuration: the turn recomputes
            log.info("session %s: resume could not prefetch (%s)", sid, e)
            loaded = 0
        self.counters["resumes"] += 1
        self.counters["prefetched_tokens"] += loaded
        self.stats.came_back(sid, tier or (placement or {}).get("action"), loaded)
        log.debug("session %s resumed: %d tokens prefetched in %.3fs", sid, loaded, time.perf_counter() - t0)
        if sess.state == SessionState.PARKED:
            info = await self._db(self.store.set_state, sid, SessionState.ACTIVE, owner=owner,
                                  expected_version=sess.version, lease_expires_at=None, parked_tier=None,
                                  kv_placement=None)
        else:
            info = await self._db(self.store.set_lease, sid, owner=owner, lease_expires_at=None, parked_tier=None,
                                  kv_placement=None, expected_version=sess.version)
        sync(sess, info)
        return loaded

    async def park(self, sess: Session, owner: Owner, tier: str, lease_s: float | None) -> dict:
        """Write the session's KV to `tier` now and pin it there until `lease_s` from now. Returns what
        moved ({"moved", blocks written / already there, device blocks freed, failed, tokens}); the
        session is marked PARKED only when every block reached the tier."""
        sid, ids = sess.id, list(sess.token_ids)
        self._cancel_timer(sid)
        res: dict[str, Any] = {"moved": False, "tokens": 0}
        if ids:
            t0 = time.perf_counter()
            res = await self._engine(lambda e: self._park_now(e, sid, ids, tier))
            res = {"moved": not res["failed"], "seconds": round(time.perf_counter() - t0, 4), **res}
        if ids and not res["moved"]:
            self.counters["park_failures"] += 1
            return res
        self.counters["parks"] += 1
        lease = time.time() + lease_s if lease_s else None
        placement = {"action": tier, "tier": tier, "tokens": res["tokens"], "at": time.time(), "tool": None,
                     "expected_wait_s": lease_s}
        info = await self._db(self.store.set_state, sid, SessionState.PARKED, owner=owner,
                              expected_version=sess.version, lease_expires_at=lease, parked_tier=tier,
                              kv_placement=placement)
        sync(sess, info)
        return res

    async def close(self, sess: Session, owner: Owner = ANY_OWNER) -> SessionInfo:
        """Release the session's hold and pins; the session is CLOSED (no more turns)."""
        sid, ids, tier = sess.id, list(sess.token_ids), sess.parked_tier
        self._cancel_timer(sid)
        await self._engine(lambda e: self._resume_now(e, sid, ids, None, tier, False))
        info = await self._db(self.store.set_state, sid, SessionState.CLOSED, owner=owner)
        sync(sess, info)
        return info

    async def fork(self, session_id: str, owner: Owner, metadata: dict | None = None) -> Session:
        """A new session with this one's history; its turns find the shared prefix's KV by content."""
        return await self._db(self.store.fork_session, session_id, owner=owner, metadata=metadata)

    async def warm(self, sess: Session, owner: Owner = ANY_OWNER, old_ids: list[int] | tuple = (), *,
                   request_class: str = "batch") -> dict:
        """After the session's stored token ids were replaced (compaction): release the hold or tier pin it
        had on `old_ids`, clear its placement, and compute the new prefix's KV once (a one-token
        generation), so its blocks are in the device prefix cache and, under write-behind with a disk or
        remote tier, written down behind it. Returns {"tokens", "computed_tokens", "cached_tokens", "seconds"}."""
        sid, ids, old, tier = sess.id, list(sess.token_ids), list(old_ids), sess.parked_tier
        await self._engine(lambda e: self._resume_now(e, sid, old, None, tier, False))
        if sess.kv_placement is not None or sess.parked_tier is not None or sess.lease_expires_at is not None:
            sync(sess, await self._db(self.store.set_lease, sid, owner=owner, lease_expires_at=None, parked_tier=None,
                                      kv_placement=None, expected_version=sess.version))
        if not ids:
            return {"tokens": 0, "computed_tokens": 0, "cached_tokens": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        final = None
        async for out in self.aeng.generate(ids, SamplingParams(max_tokens=1, temperature=0.0),
                                            request_id=f"{sid}-warm-{time.time_ns()}", request_class=request_class):
            final = out
        if final is None:
            raise KvstrataError(f"session {sid}: warming its prefix produced no output")
        m = final.metrics
        return {"tokens": len(ids), "computed_tokens": m.computed_prompt_tokens, "cached_tokens": m.cached_prompt_tokens,
                "seconds": round(time.perf_counter() - t0, 4)}

    async def prefetch(self, token_ids: list[int]) -> int:
        """Load the stored prefix of token_ids into device memory (as cached blocks); tokens loaded."""
        ids = list(token_ids)
        return await self._engine(lambda e: e.offload.prefetch(ids) if e.offload is not None and ids else 0)

    async def locate(self, token_ids: list[int]) -> dict[str, int]:
        """Tokens of the longest stored prefix of token_ids, per place ("device" and the tier names)."""
        ids = list(token_ids)
        return await self._engine(lambda e: e.kv.locate(ids) if ids else {})

    def held(self, session_id: str) -> bool:
        return session_id in self._holds

    # -- housekeeping -----------------------------------------------------------------------------
    async def sweep_leases(self) -> int:
        """Sessions whose lease ended: unpin their KV at the tier and clear the lease. They stay where
        they are (parked, or waiting on a tool); their KV stays in the tier until evicted."""
        expired = await self._db(self.store.sessions_expired_leases, time.time())
        for info in expired:
            try:
                if info.parked_tier:
                    sess = await self._db(self.store.get_session, info.id, owner=ANY_OWNER)
                    ids, tier = list(sess.token_ids), info.parked_tier
                    await self._engine(lambda e: e.offload.unpin(ids, tier)
                                       if e.offload is not None and tier in e.offload.tier_names else None)
                await self._db(self.store.set_lease, info.id, owner=ANY_OWNER, lease_expires_at=None)
            except Exception as e:  # noqa: BLE001 - deleted or closed meanwhile: the next sweep skips it
                log.info("lease sweep: session %s: %s", info.id, e)
        return len(expired)

    async def park_all(self, sessions: dict[str, Owner], tier: str, budget_s: float = 30.0) -> int:
        """At a graceful shutdown: park the sessions this process served at `tier`, so that after a
        restart their next turn loads the prefix instead of recomputing it. Returns how many."""
        t0 = time.monotonic()
        n = 0
        for sid, owner in list(sessions.items()):
            if time.monotonic() - t0 > budget_s:
                log.warning("shutdown: parking budget spent; %d sessions left unparked", len(sessions) - n)
                break
            try:
                sess = await self._db(self.store.get_session, sid, owner=owner)
                if sess.state == SessionState.CLOSED or not sess.token_ids:
                    continue
                if (await self.park(sess, owner, tier, None))["moved"]:
                    n += 1
            except Exception as e:  # noqa: BLE001 - a deleted session, a tier not configured: go on
                log.warning("shutdown: could not park session %s: %s", sid, e)
        log.info("shutdown: parked %d sessions at %s in %.2fs", n, tier, time.monotonic() - t0)
        return n
