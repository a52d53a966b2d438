"""KV-aware routing as a Ray Serve `RequestRouter`: session affinity, longest cached prefix, load.

The ingress (cluster/ingress.py) reads each request once and attaches `RouteHints` to it: the replica
that served the request's session last (affinity), and per replica the tokens of the request's prompt
its device pool holds (from the KV events, cluster/index.py). The router runs inside the ingress's
deployment handle (Ray Serve builds it from `request_router_class`), reads the hints from the pending
request and ranks the live replicas with `decide`:

1. affinity: the session's replica, if it is live and not overloaded;
2. prefix: the replica holding the longest prefix of the prompt, among those not overloaded
   (equal prefixes: the less loaded);
3. load: the least loaded (fewest ongoing requests, then lowest KV usage; ties at random).

A replica is overloaded when it runs `imbalance` or more requests beyond the least loaded replica, or
its device pool is `kv_usage_max` full while another is not; so load breaks ties and overrides
affinity when replicas are imbalanced. Load is Ray's own count of ongoing requests per replica (the
queue-length cache the handle keeps, updated as requests are sent and finish) and the replica's
routing stats (`record_routing_stats`: queue depth and KV usage, polled by Ray). The other live
replicas follow the first choice, least loaded first, so a replica that rejects (at its
max_ongoing_requests) passes the request on. Every decision is counted with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from kvstrata.cluster import metrics
from kvstrata.cluster.hints import ForwardRequest, RouteHints

log = logging.getLogger(__name__)

IDLE_ROUTING_TASK_PAUSE_S = 0.005
REASONS = ("affinity", "prefix", "load", "affinity_overloaded", "affinity_lost", "prefix_overloaded")


@dataclass(frozen=True)
class Load:
    ongoing: int
    kv_usage: float = 0.0


@dataclass(frozen=True)
class Policy:
    imbalance: int = 4  # ongoing requests beyond the least loaded replica that make a replica overloaded
    kv_usage_max: float = 0.95  # a device pool this full is overloaded while another is not


def decide(hints: RouteHints | None, loads: dict[str, Load], policy: Policy = Policy(),
           rng: random.Random | None = None) -> tuple[list[str], str]:
    """Rank the live replicas (`loads`' keys) for one request; returns (ranking, reason)."""
    if not loads:
        return [], "load"
    rng = rng or random
    least = min(v.ongoing for v in loads.values())
    roomy = any(v.kv_usage < policy.kv_usage_max for v in loads.values())

    def overloaded(r: str) -> bool:
        v = loads[r]
        return v.ongoing - least >= policy.imbalance or (roomy and v.kv_usage >= policy.kv_usage_max)

    tiebreak = {r: rng.random() for r in loads}
    by_load = sorted(loads, key=lambda r: (loads[r].ongoing, loads[r].kv_usage, tiebreak[r]))

    def ranked(first: str) -> list[str]:
        return [first] + [r for r in by_load if r != first]

    note = None
    if hints is not None and hints.affinity:
        if hints.affinity in loads and not overloaded(hints.affinity):
            return ranked(hints.affinity), "affinity"
        note = "affinity_overloaded" if hints.affinity in loads else "affinity_lost"
    prefix = {r: n for r, n in (hints.prefix if hints else {}).items() if r in loads and n > 0}
    if prefix:
        fits = [r for r in prefix if not overloaded(r)]
        if fits:
            best = max(fits, key=lambda r: (prefix[r], -loads[r].ongoing, -loads[r].kv_usage, tiebreak[r]))
            return ranked(best), note or "prefix"
        note = note or "prefix_overloaded"
    return by_load, note or "load"


class KVAwareRouter(FIFOMixin, RequestRouter):
    """Ray Serve's extension point for replica choice; see the module docstring. request_router_kwargs:
    `imbalance`, `kv_usage_max` (Policy).

    Ray runs several routing tasks; each takes a pending request, calls choose_replicas for it and
    hands the replica it got to "the next pending request". The replica goes to the request it was
    chosen for while that one still waits; otherwise (another task placed it, or this task had none)
    to the oldest waiting request, as with Ray's FIFOMixin, so that no request is ever left without a
    task to place it (without the fallback one was, under load: a hang)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = Policy()
        self._reasons: dict[str, str] = {}  # internal request id -> why its replica was chosen

    def _get_pending_request_matching_metadata(self, request_metadata=None):
        return self._get_pending_request_matching_internal_request_id(request_metadata)

    def initialize_state(self, imbalance: int = Policy.imbalance, kv_usage_max: float = Policy.kv_usage_max,
                         **_: Any) -> None:
        self.policy = Policy(int(imbalance), float(kv_usage_max))

    def _load(self, r: RunningReplica) -> Load:
        stats = r.routing_stats or {}
        queued = self._replica_queue_len_cache.get(r.replica_id)
        ongoing = queued if queued is not None else int(stats.get("ongoing", 0))
        rid, name = r.replica_id.unique_id, self._deployment_id.name
        metrics.REPLICA.labels(name, rid, "ongoing").set(ongoing)
        for stat in ("waiting", "running", "kv_usage"):
            if stat in stats:
                metrics.REPLICA.labels(name, rid, stat).set(stats[stat])
        return Load(int(ongoing), float(stats.get("kv_usage", 0.0)))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        # Yield to the router's event loop first: Ray calls this in a loop, and a routing task left with no
        # request of its own (another task took it) calls it until that request is placed; a call that
        # never awaits would hold the loop and the placing task would never run (a livelock, seen here).
        await asyncio.sleep(0 if pending_request is not None else IDLE_ROUTING_TASK_PAUSE_S)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        hints = None
        if pending_request is not None:
            for a in pending_request.args:
                if isinstance(a, (ForwardRequest, RouteHints)):
                    hints = a.route if isinstance(a, ForwardRequest) else a
                    break
        order, reason = decide(hints, {rid: self._load(r) for rid, r in by_id.items()}, self.policy)
        if pending_request is not None:
            self._reasons[pending_request.metadata.internal_request_id] = reason
            # every live replica is in the ranking: if none takes the request, Ray must back off before
            # asking again (without this flag it retries at once, and a spinning router thread starves
            # the thread that delivers the replicas' queue-length replies: a livelock, seen under load)
            pending_request.routing_context.should_backoff = True
        return [[by_id[order[0]]], [by_id[r] for r in order[1:]]] if order else []

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        reason = self._reasons.pop(pending_request.metadata.internal_request_id, None)
        if reason is not None:
            metrics.route_decision(self._deployment_id.name, reason)
        if len(self._reasons) > 10_000:  # requests cancelled before routing leave entries behind
            self._reasons.clear()
