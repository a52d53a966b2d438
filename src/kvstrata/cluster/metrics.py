"""The cluster's own metrics, served at the ingress's GET /metrics beside the replicas' gauges.

One registry per process: the router is built by Ray Serve inside the ingress's deployment handle, in
the ingress's process, and counts there; the ingress renders the same registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()

ROUTE_DECISIONS = Counter("kvstrata_cluster_route_decisions", "replica choices by the KV-aware router, by reason "
                          "(affinity, prefix, load, affinity_overloaded, affinity_lost, prefix_overloaded)",
                          ["deployment", "reason"], registry=REGISTRY)
RETRIES = Counter("kvstrata_cluster_retries", "requests sent again because their replica died before answering",
                  ["reason"], registry=REGISTRY)
FAILED_MIDSTREAM = Counter("kvstrata_cluster_replica_lost_midstream",
                           "replies cut by a replica's death after the first bytes (ended with a retryable error)",
                           registry=REGISTRY)
PD_DECISIONS = Counter("kvstrata_cluster_prefill_decisions",
                       "where a prompt was prefilled: local (on the decode replica) or on a prefill replica, with "
                       "the handover (shared-tier, object-store)", ["action"], registry=REGISTRY)
HANDOVER = Histogram("kvstrata_cluster_prefill_handover_seconds",
                     "remote prefill plus KV handover, until the decode replica can start",
                     ["transport"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                     registry=REGISTRY)
REPLICA = Gauge("kvstrata_cluster_replica", "per replica, as the router last saw it: ongoing (requests sent, not "
                "finished), waiting and running (the engine's queue), kv_usage (device pool)",
                ["deployment", "replica", "stat"], registry=REGISTRY)


def route_decision(deployment: str, reason: str) -> None:
    ROUTE_DECISIONS.labels(deployment, reason).inc()


def render() -> bytes:
    return generate_latest(REGISTRY)
