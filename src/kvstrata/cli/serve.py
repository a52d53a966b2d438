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

from kvstrata.config import add_engine_args, engine_config_from_args, parse_bytes
from kvstrata.core import KvstrataError
from kvstrata.startup import since_process_start

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--api-key", action="append", default=[],
                   help="accept this API key (repeatable); with none, the server is open")
    g.add_argument("--api-key-file", help="file of API keys, one per line (# comments allowed)")
    g.add_argument("--session-store", default=None,
                   help="session store: a SQLite path or postgresql:// URL (default $KVSTRATA_HOME/sessions.db)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to wait for the engine; more get 429 with Retry-After (default 256)")
    g.add_argument("--served-model-name", action="append", default=[],
                   help="model name(s) clients use (repeatable; default: the --model value and the file's name)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    g.add_argument("--no-park-on-shutdown", action="store_true",
                   help="do not park served sessions at the disk tier on shutdown")
    g.add_argument("--no-resume-jobs", action="store_true",
                   help="do not resume, at start, the unfinished jobs clients submitted to /v1/jobs (set it when "
                        "several servers share one session store: each would resume them)")
    add_cluster_arguments(p)
    from kvstrata.server.limits import add_limit_args

    add_limit_args(p)
    m = p.add_argument_group("memory (docs/memory.md)")
    m.add_argument("--no-recall", action="store_true",
                   help="do not embed session messages for recall (/v1/memory/search and the memory_search tool)")
    m.add_argument("--retention-session-ttl", type=float, default=None, metavar="S",
                   help="delete sessions (conversations) not updated for S seconds, with their responses (default: keep)")
    m.add_argument("--retention-max-sessions", type=int, default=None, metavar="N",
                   help="keep at most N sessions per API key, the most recently updated (default: no limit)")
    m.add_argument("--retention-response-ttl", type=float, default=None, metavar="S",
                   help="delete stored responses older than S seconds (their sessions stay; default: keep)")
    m.add_argument("--retention-max-responses", type=int, default=None, metavar="N",
                   help="keep at most N stored responses per API key, the newest (default: no limit)")
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


def read_api_keys(args: argparse.Namespace) -> list[str]:
    keys = [k.strip() for k in args.api_key if k.strip()]
    if args.api_key_file:
        path = Path(args.api_key_file)
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


def model_names(args: argparse.Namespace, cfg) -> list[str]:
    if args.served_model_name:
        return list(dict.fromkeys(args.served_model_name))
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
    from kvstrata.server.limits import limits_from_args
    from kvstrata.sessions import open_store

    if args.max_waiting < 0:
        raise KvstrataError("--max-waiting must be >= 0")
    keys = read_api_keys(args)
    limits = limits_from_args(args)
    cfg = engine_config_from_args(args)
    if wants_cluster(args):  # the one place the CLI reaches into kvstrata.cluster, lazily
        from kvstrata.cluster.launch import options_from_args, run as run_cluster

        return run_cluster(args, options_from_args(args), cfg, store=args.session_store or default_store_path(),
                           model_names=model_names(args, cfg), api_keys=keys)
    store = open_store(args.session_store or default_store_path())
    try:  # built on the thread that will step it (engine/async_engine.py says why)
        aengine = AsyncEngine(lambda: LLMEngine(cfg), max_waiting=args.max_waiting)
    except BaseException:
        store.close()
        raise
    park_tier = "disk" if (cfg.kv_disk_dir and not args.no_park_on_shutdown) else None
    app = create_app(aengine, store, model_names=model_names(args, cfg), api_keys=keys,
                     close_on_shutdown=True, park_tier_on_shutdown=park_tier, resume_jobs=not args.no_resume_jobs,
                     limits=limits)
    from kvstrata.server.memory_api import Retention, configure

    recall = None
    if not args.no_recall:
        from kvstrata.memory import Recall

        recall = Recall(store)
    for flag in ("retention_max_sessions", "retention_max_responses"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise KvstrataError(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("retention_session_ttl", "retention_response_ttl"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise KvstrataError(f"--{flag.replace('_', '-')} must be > 0 seconds")
    configure(app, recall=recall, retention=Retention(
        session_ttl_s=args.retention_session_ttl, max_sessions_per_owner=args.retention_max_sessions,
        response_ttl_s=args.retention_response_ttl, max_responses_per_owner=args.retention_max_responses))
    base = f"http://{args.host}:{args.port}"
    auth = ' -H "Authorization: Bearer $KVSTRATA_API_KEY"' if keys else ""
    name = app.state.kv.model_id
    print(f"kvstrata: serving {name!r} at {base}/v1 (sessions: {redact_url(args.session_store or default_store_path())})",
          flush=True)
    print(f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
          flush=True)
    log.info("engine built in %.2f s; the server binds %.2f s after process start (start phases at --log-level debug)",
             aengine.engine.start_phases.total, since_process_start())
    level = logging.getLevelName(logging.getLogger().level).lower()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=level if level != "notset" else "warning",
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    server.run()
    return 0 if server.started else 1
