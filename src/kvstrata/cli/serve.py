"""`kvstrata serve`: the OpenAI-compatible HTTP server with durable sessions (docs/server.md).

SIGTERM / Ctrl-C shut down gracefully: no new connections, in-flight requests finish (up to
--shutdown-timeout seconds), the sessions this process served are parked at the disk tier when one
is configured, then the engine stops and the session store closes.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from kvstrata.config import add_engine_args, engine_config_from_args
from kvstrata.core import KvstrataError

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
    from kvstrata.loader import kvstrata_home

    home = kvstrata_home()
    home.mkdir(parents=True, exist_ok=True)
    return str(home / "sessions.db")


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
    from kvstrata.sessions import open_store

    if args.max_waiting < 0:
        raise KvstrataError("--max-waiting must be >= 0")
    keys = read_api_keys(args)
    cfg = engine_config_from_args(args)
    store = open_store(args.session_store or default_store_path())
    try:  # built on the thread that will step it (engine/async_engine.py says why)
        aengine = AsyncEngine(lambda: LLMEngine(cfg), max_waiting=args.max_waiting)
    except BaseException:
        store.close()
        raise
    park_tier = "disk" if (cfg.kv_disk_dir and not args.no_park_on_shutdown) else None
    app = create_app(aengine, store, model_names=model_names(args, cfg), api_keys=keys,
                     close_on_shutdown=True, park_tier_on_shutdown=park_tier, resume_jobs=not args.no_resume_jobs)
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
    print(f"kvstrata: serving {name!r} at {base}/v1 (sessions: {args.session_store or default_store_path()})",
          flush=True)
    print(f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
          flush=True)
    level = logging.getLevelName(logging.getLogger().level).lower()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=level if level != "notset" else "warning",
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    server.run()
    return 0 if server.started else 1
