"""Building and running a kvstrata cluster on Ray Serve.

    build_app(opts, ...)   the Ray Serve application: the engine deployment (or prefill + decode
                           deployments) behind the ingress, with the router, autoscaling and actor
                           options; tests and benchmarks deploy it with `serve.run`
    run(args, ...)         `kvstrata serve --replicas N` (cli/serve.py): a local Ray instance (or
                           --ray-address), a local redis-server when no --kv-redis-url is given,
                           the application, then wait for SIGTERM / Ctrl-C and stop it all
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from kvstrata.config import EngineConfig
from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)

APP_NAME = "kvstrata"
ROUTERS = {"kvstrata": "kvstrata.cluster.router.KVAwareRouter",
           "ray-default": "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter"}


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int = 1  # engine replicas (prefill and decode together)
    prefill_replicas: int = 0  # > 0 with decode_replicas: disaggregated prefill and decode
    decode_replicas: int = 0
    min_replicas: int | None = None  # Ray Serve autoscaling (engine deployment): min / max replicas ...
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # ... and the ongoing requests per replica it aims at
    replica_cpus: float = 1.0  # Ray logical CPUs per replica actor
    max_ongoing_requests: int = 64  # per replica; beyond it Ray queues or routes elsewhere
    router: str = "kvstrata"  # kvstrata | ray-default (power of two choices)
    imbalance: int = 4  # ongoing requests beyond the least loaded replica that override affinity
    pd_transport: str = "shared-tier"  # shared-tier | object-store
    stats_period_s: float = 0.5  # how often Ray reads each replica's routing stats

    def __post_init__(self) -> None:
        if self.prefill_replicas < 0 or self.decode_replicas < 0 or (self.prefill_replicas > 0) != (self.decode_replicas > 0):
            raise KvstrataError("give both --prefill-replicas and --decode-replicas (each >= 1), or neither")
        if self.replicas < 1 and not self.decode_replicas:
            raise KvstrataError("--replicas must be >= 1")
        if self.router not in ROUTERS:
            raise KvstrataError(f"--cluster-router must be one of {sorted(ROUTERS)}, got {self.router!r}")
        if self.pd_transport not in ("shared-tier", "object-store"):
            raise KvstrataError(f"--pd-transport must be shared-tier or object-store, got {self.pd_transport!r}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise KvstrataError("give both --min-replicas and --max-replicas for autoscaling, or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise KvstrataError("autoscaling needs 0 <= --min-replicas <= --max-replicas")

    @property
    def disaggregated(self) -> bool:
        return self.decode_replicas > 0


def worker_env() -> dict[str, str]:
    """Environment Ray's workers need to import and run this checkout like the driver."""
    keep = ("PYTHONPATH", "KVSTRATA_HOME", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _deployment(cls, name: str, opts: ClusterOptions, replicas: int, autoscale: bool, engine: bool = True):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    kw: dict[str, Any] = dict(name=name, max_ongoing_requests=opts.max_ongoing_requests,
                              ray_actor_options={"num_cpus": opts.replica_cpus if engine else 0},
                              health_check_period_s=2.0, health_check_timeout_s=60.0, graceful_shutdown_timeout_s=30.0)
    if engine:
        kw["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTERS[opts.router], request_routing_stats_period_s=opts.stats_period_s,
            request_router_kwargs={"imbalance": opts.imbalance} if opts.router == "kvstrata" else {})
    if autoscale and opts.min_replicas is not None:
        kw["autoscaling_config"] = {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
                                    "initial_replicas": max(opts.min_replicas, 1),
                                    "target_ongoing_requests": opts.target_ongoing_requests or 8}
    else:
        kw["num_replicas"] = replicas
    return serve.deployment(cls).options(**kw)


def build_app(opts: ClusterOptions, cfg: EngineConfig, *, store: str, redis_url: str, model_names: list[str],
              api_keys: list[str] = (), max_waiting: int = 256, park_on_shutdown: bool = True,
              resume_jobs: bool = True, events_prefix: str = "kvstrata:cluster:"):
    """The bound Ray Serve application (ingress -> engine replicas, or -> decode + prefill replicas)."""
    from kvstrata.cluster.ingress import Ingress, IngressSpec
    from kvstrata.cluster.replica import EngineReplica, ReplicaSpec

    env = worker_env()
    engine = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EngineConfig)}
    spec = ReplicaSpec(engine=engine, store=store, redis_url=redis_url, events_prefix=events_prefix,
                       model_names=tuple(model_names), api_keys=tuple(api_keys), max_waiting=max_waiting,
                       park_on_shutdown=park_on_shutdown, resume_jobs=resume_jobs, env=env)
    ingress = _deployment(Ingress, "ingress", opts, 1, False, engine=False)
    ispec = IngressSpec(model=cfg.model, store=store, redis_url=redis_url, events_prefix=events_prefix,
                        pd_transport=opts.pd_transport, api_keys=tuple(api_keys), env=env)
    if not opts.disaggregated:
        return ingress.bind(_deployment(EngineReplica, "engine", opts, opts.replicas, True).bind(spec), ispec)
    decode = _deployment(EngineReplica, "decode", opts, opts.decode_replicas, False)
    prefill = _deployment(EngineReplica, "prefill", opts, opts.prefill_replicas, False)
    return ingress.bind(decode.bind(dataclasses.replace(spec, role="decode")), ispec,
                        prefill.bind(dataclasses.replace(spec, role="prefill", resume_jobs=False)))


def options_from_args(args) -> ClusterOptions:
    return ClusterOptions(
        replicas=1 if args.replicas is None else args.replicas, prefill_replicas=args.prefill_replicas or 0,
        decode_replicas=args.decode_replicas or 0, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, replica_cpus=args.replica_cpus,
        router=args.cluster_router, imbalance=args.route_imbalance, pd_transport=args.pd_transport)


def run(args, scfg, opts: ClusterOptions, cfg: EngineConfig, *, store: str, model_names: list[str],
        api_keys: list[str]) -> int:
    """`kvstrata serve --replicas N ...`: runs until SIGTERM / SIGINT, then stops the application, Ray
    (when it started it) and the local redis-server (when it started one)."""
    import ray
    from ray import serve

    from kvstrata.cluster.redis_local import LocalRedis

    local_redis = None
    if not cfg.kv_redis_url:
        if args.ray_address:
            raise KvstrataError("a cluster over several machines needs a shared --kv-redis-url every node reaches")
        local_redis = LocalRedis().start()
    redis_url = cfg.kv_redis_url or local_redis.url
    stop = threading.Event()
    try:
        n = opts.decode_replicas + opts.prefill_replicas if opts.disaggregated else (opts.max_replicas or opts.replicas)
        ray.init(address=args.ray_address or None, include_dashboard=False, runtime_env={"env_vars": worker_env()},
                 **({} if args.ray_address else {"num_cpus": max(os.cpu_count() or 1, int(n * opts.replica_cpus) + 1),
                                                "object_store_memory": args.object_store_bytes}))
        serve.start(http_options={"host": scfg.host, "port": scfg.port})
        app = build_app(opts, cfg, store=store, redis_url=redis_url, model_names=model_names, api_keys=api_keys,
                        max_waiting=scfg.max_waiting, park_on_shutdown=scfg.park_on_shutdown,
                        resume_jobs=scfg.resume_jobs)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        layout = (f"{opts.prefill_replicas} prefill + {opts.decode_replicas} decode replicas" if opts.disaggregated
                  else f"{opts.replicas} replicas")
        print(f"kvstrata: cluster of {layout} serving {model_names[0]!r} at http://{scfg.host}:{scfg.port}/v1 "
              f"(router: {opts.router}; KV tier: {redis_url}; sessions: {store})", flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("kvstrata: stopping the cluster", flush=True)
        serve.shutdown()
        return 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if local_redis is not None:
            local_redis.stop()
