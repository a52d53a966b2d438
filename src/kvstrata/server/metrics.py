"""Prometheus metrics at GET /metrics: requests, tokens, latency histograms, queue depth, KV pool use.

Each app owns a CollectorRegistry (several servers can live in one process, as the tests do). Gauges
that describe the engine (queue depth, KV blocks) are read from the engine thread at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from kvstrata.core import RequestOutput

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvstrata_http_requests", "HTTP requests by route and status code",
                                ["route", "method", "status"], registry=r)
        self.prompt_tokens = Counter("kvstrata_prompt_tokens", "prompt tokens of finished and aborted requests",
                                     registry=r)
        self.generation_tokens = Counter("kvstrata_generation_tokens", "generated tokens", registry=r)
        self.cached_prompt_tokens = Counter(
            "kvstrata_cached_prompt_tokens", "prompt tokens loaded instead of computed, by tier", ["tier"], registry=r)
        self.finished = Counter("kvstrata_requests_finished", "engine requests finished, by reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("kvstrata_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kvstrata_time_per_output_token_seconds", "mean inter-token latency per request",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("kvstrata_request_latency_seconds", "arrival to finish", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.waiting = Gauge("kvstrata_requests_waiting", "requests queued in the engine (queue depth)", registry=r)
        self.running = Gauge("kvstrata_requests_running", "requests streaming from the engine", registry=r)
        self.kv_blocks = Gauge("kvstrata_kv_blocks", "device KV pool blocks by state", ["state"], registry=r)
        self.kv_usage = Gauge("kvstrata_kv_usage_ratio", "fraction of device KV blocks in use", registry=r)
        self.engine = Gauge("kvstrata_engine_counter", "the engine's own counters (steps, preemptions, tokens)",
                            ["name"], registry=r)
        # the KV tiers below device memory (the same figures as `kvstrata cache stats`)
        self.tier = Gauge("kvstrata_kv_tier", "per KV tier: blocks, bytes, hits, misses, hit_rate, bytes_read, "
                          "bytes_written, read_gbps, write_gbps, put_failures, evictions, errors, verified_hits",
                          ["tier", "stat"], registry=r)
        self.tier_discards = Gauge("kvstrata_kv_tier_discards", "blocks that failed verification, by tier and reason",
                                   ["tier", "reason"], registry=r)
        self.placement = Gauge("kvstrata_placement_decisions", "placement cost-model decisions by action",
                               ["action"], registry=r)
        self.admission = Gauge("kvstrata_admission", "the admission gate: requests in progress by class "
                               "(interactive, batch), waiting, and counts since start (admitted, rejected_full, "
                               "rejected_quota, waited, engine_full_retries)", ["what"], registry=r)
        self.session_kv = Gauge("kvstrata_session_kv", "session and agent-program KV between requests, counts since "
                                "start (pauses, parks, resumes, ttl_expiries, prefetched_tokens, prefetched_ahead_tokens, "
                                "program_pauses, program_resumes, ...)", ["what"], registry=r)

    def observe_output(self, out: "RequestOutput") -> None:
        """Record a finished engine request."""
        m = out.metrics
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        ngen = sum(len(o.token_ids) for o in out.outputs)
        self.generation_tokens.inc(ngen)
        for tier, n in (m.cached_prompt_tokens_by_tier or {}).items():
            self.cached_prompt_tokens.labels(tier).inc(n)
        if not m.cached_prompt_tokens_by_tier and m.cached_prompt_tokens:
            self.cached_prompt_tokens.labels("device").inc(m.cached_prompt_tokens)
        for o in out.outputs:
            self.finished.labels(o.finish_reason.value if o.finish_reason else "none").inc()
        if m.ttft_s is not None:
            self.ttft.observe(max(0.0, m.ttft_s))
        n0 = len(out.outputs[0].token_ids)
        rate = m.decode_tokens_per_s(n0)
        if rate:
            self.tpot.observe(1.0 / rate)
        if m.finished_time is not None:
            self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))

    def observe_aborted(self, out: "RequestOutput") -> None:
        """Record a request aborted after it started (its client left): its prompt and the tokens generated
        so far count, with finish_reason `abort`."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(sum(len(o.token_ids) for o in out.outputs))
        self.finished.labels("abort").inc()

    def _tiers(self, kv: dict) -> None:
        for name, st in (kv.get("tiers") or {}).items():
            for stat in ("blocks", "bytes", "hits", "misses", "hit_rate", "bytes_read", "bytes_written", "read_gbps",
                         "write_gbps", "put_failures", "evictions", "errors", "verified_hits"):
                v = st.get(stat)
                if isinstance(v, (int, float)):
                    self.tier.labels(name, stat).set(v)
            for reason, n in (st.get("discards") or {}).items():
                self.tier_discards.labels(name, reason).set(n)
        for action, n in (kv.get("placement", {}).get("decisions") or {}).items():
            self.placement.labels(action).set(n)

    async def render(self, aengine, admission=None, skv=None) -> bytes:
        try:
            summary, waiting, counters, kv = await asyncio.shield(aengine.call_async(  # a scraper that leaves
                lambda e: (e.pool.summary(), len(e.scheduler.waiting), dict(e.counters), e.kv_stats())))  # cancels nothing there
            self._tiers(kv)
            self.waiting.set(waiting)
            for k, v in counters.items():
                if isinstance(v, (int, float)):
                    self.engine.labels(k).set(v)
            for k, v in summary.items():
                self.kv_blocks.labels(k).set(v)
            self.kv_usage.set(summary["in_use"] / max(1, summary["total"]))
        except Exception as e:  # a dead engine still lets the counters be scraped
            log.warning("could not read engine gauges: %s", e)
        self.running.set(aengine.num_active)
        if admission is not None:
            for what, v in admission.snapshot().items():
                self.admission.labels(what).set(v)
        if skv is not None:
            for what, v in skv.counters.items():
                self.session_kv.labels(what).set(v)
        return generate_latest(self.registry)
