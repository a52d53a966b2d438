"""`kvstrata serve`: the OpenAI-compatible HTTP server with durable sessions (docs/server.md).

SIGTERM / Ctrl-C shut down gracefully: no new connections, in-flight requests finish (up to
--shutdown-timeout seconds), the sessions this process served are parked at the disk tier when one
is configured, then the engine stops and the session store closes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from kvstrata.config import (ServerConfig, add_config_args, add_engine_args, config_from_args, engine_config_from_args,
                             parse_bytes, parse_sampling)
from kvstrata.core import KvstrataError
from kvstrata.startup import since_process_start

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvstrata serve`, generated from the configuration dataclasses (ServerConfig,
    ServerLimits, EngineConfig: a help string per field; `--config FILE` takes the same keys)."""
    from kvstrata.server.limits import ServerLimits

    add_config_args(p, ServerConfig, "server")
    add_config_args(p, ServerLimits, "limits (docs/server.md)")
    add_cluster_arguments(p)
    add_engine_args(p)


# -- a cluster on Ray Serve (kvstrata.cluster, docs/cluster.md); Ray is imported only when these are given
def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (Ray Serve; docs/cluster.md)")
    g.add_argument("--replicas", type=int, help="run N engine replicas behind one ingress (a Ray Serve cluster)")
    g.add_argument("--prefill-replicas", type=int, help="disaggregated: replicas that prefill long prompts ...")
    g.add_argument("--decode-replicas", type=int, help="... and replicas that decode (give both)")
    g.add_argument("--min-replicas", type=int, help="Ray Serve autoscaling: fewest engine replicas")
    g.add_argument("--max-replicas", type=int, help="Ray Serve autoscaling: most engine replicas")
    g.add_argument("--target-ongoing-requests", type=float, help="Ray Serve autoscaling: requests per replica")
    g.add_argument("--ray-address", help="join a running Ray cluster (`ray start` on each machine) instead of "
                   "starting a local Ray instance")
    g.add_argument("--cluster-router", default="kvstrata", choices=["kvstrata", "ray-default"],
                   help="replica choice: kvstrata (session affinity, cached prefix, load) or Ray's default "
                        "power-of-two-choices (default kvstrata)")
    g.add_argument("--route-imbalance", type=int, default=4,
                   help="ongoing requests beyond the least loaded replica that override affinity (default 4)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs reserved per replica (default 1)")
    g.add_argument("--pd-transport", default="shared-tier", choices=["shared-tier", "object-store"],
                   help="how prefilled KV reaches the decode replica (default shared-tier)")
    g.add_argument("--object-store-bytes", type=parse_bytes, default=parse_bytes("512M"),
                   help="Ray object store of a local Ray instance (default 512M)")


def wants_cluster(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("replicas", "prefill_replicas", "decode_replicas",
                                                           "min_replicas", "max_replicas", "ray_address"))


def read_api_keys(scfg: ServerConfig) -> list[str]:
    keys = [k.strip() for k in scfg.api_key if k.strip()]
    if scfg.api_key_file:
        path = Path(scfg.api_key_file)
        if not path.is_file():
            raise KvstrataError(f"--api-key-file {path} does not exist")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


def default_store_path() -> str:
    from kvstrata.core import kvstrata_home

    home = kvstrata_home()
    home.mkdir(parents=True, exist_ok=True)
    return str(home / "sessions.db")


def redact_url(url: str) -> str:
    """A store URL or libpq DSN fit to print: the password (`user:PW@`, `password=PW`) shown as ***."""
    out = re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^/@:?#]*):[^/?#]*@", r"\1:***@", out, flags=re.I)


def model_names(scfg: ServerConfig, cfg) -> list[str]:
    if scfg.served_model_name:
        return list(dict.fromkeys(scfg.served_model_name))
    names = [str(cfg.model)]
    stem = Path(str(cfg.model).rstrip("/")).name.removesuffix(".gguf")
    if stem and stem not in names:
        names.append(stem)
    return names


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from kvstrata.engine.async_engine import AsyncEngine
    from kvstrata.engine.llm_engine import LLMEngine
    from kvstrata.server import create_app
    from kvstrata.server.limits import ServerLimits
    from kvstrata.sessions import open_store

    scfg = config_from_args(ServerConfig, args)
    keys = read_api_keys(scfg)
    limits = config_from_args(ServerLimits, args)
    cfg = engine_config_from_args(args)
    store_url = scfg.session_store or default_store_path()
    if wants_cluster(args):  # the one place the CLI reaches into kvstrata.cluster, lazily
        from kvstrata.cluster.launch import options_from_args, run as run_cluster

        return run_cluster(args, scfg, options_from_args(args), cfg, store=store_url,
                           model_names=model_names(scfg, cfg), api_keys=keys)
    store = open_store(store_url)
    try:  # built on the thread that will step it (engine/async_engine.py says why)
        aengine = AsyncEngine(lambda: LLMEngine(cfg), max_waiting=scfg.max_waiting)
    except BaseException:
        store.close()
        raise
    park_tier = "disk" if (cfg.kv_disk_dir and scfg.park_on_shutdown) else None
    app = create_app(aengine, store, model_names=model_names(scfg, cfg), api_keys=keys,
                     close_on_shutdown=True, park_tier_on_shutdown=park_tier, resume_jobs=scfg.resume_jobs,
                     limits=limits,
                     default_sampling=parse_sampling(scfg.default_sampling) if scfg.default_sampling else None)
    from kvstrata.server.memory_api import Retention, configure

    recall = None
    if scfg.recall:
        from kvstrata.memory import Recall

        recall = Recall(store)
    configure(app, recall=recall, retention=Retention(
        session_ttl_s=scfg.retention_session_ttl, max_sessions_per_owner=scfg.retention_max_sessions,
        response_ttl_s=scfg.retention_response_ttl, max_responses_per_owner=scfg.retention_max_responses))
    base = f"http://{scfg.host}:{scfg.port}"
    auth = ' -H "Authorization: Bearer $KVSTRATA_API_KEY"' if keys else ""
    name = app.state.kv.model_id
    print(f"kvstrata: serving {name!r} at {base}/v1 (sessions: {redact_url(store_url)})",
          flush=True)
    print(f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
          flush=True)
    log.info("engine built in %.2f s; the server binds %.2f s after process start (start phases at --log-level debug)",
             aengine.engine.start_phases.total, since_process_start())
    level = logging.getLevelName(logging.getLogger().level).lower()
    config = uvicorn.Config(app, host=scfg.host, port=scfg.port, log_level=level if level != "notset" else "warning",
                            timeout_graceful_shutdown=scfg.shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    server.run()
    return 0 if server.started else 1
