"""A local Ray instance for the cluster tests: one per test module that needs it (Ray takes ~20 s to
start here; shut down at the module's end, so nothing of it stays while the rest of the suite runs),
small (4 logical CPUs, a 128 MiB object store, no dashboard), replicas with one torch thread and a
small KV pool each; a local redis-server.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.server.harness import free_port


@dataclass
class Deployed:
    url: str
    store: str
    redis_url: str
    name: str

    def client(self, **kw):
        import openai

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 180)
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", **kw)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=30).text


def decisions(text: str) -> dict[str, float]:
    """{"deployment/reason": count} from the ingress's /metrics text."""
    out = {}
    for line in text.splitlines():
        if line.startswith("kvstrata_cluster_route_decisions_total{"):
            labels, value = line[len("kvstrata_cluster_route_decisions_total{"):].split("} ")
            d = dict(kv.split("=", 1) for kv in labels.split(","))
            out[f"{d['deployment'].strip(chr(34))}/{d['reason'].strip(chr(34))}"] = float(value)
    return out


def replica_pids(app: str = "kvstrata") -> dict[str, int]:
    """Live Serve replicas of `app`: replica id -> pid (from Ray's actor table)."""
    import ray._private.state as state

    out = {}
    for a in state.actors().values():
        name = a.get("Name") or ""
        if a.get("State") == "ALIVE" and name.startswith(f"SERVE_REPLICA::{app}#"):
            _, deployment, rid = name.split("#")
            if deployment != "ingress":
                out[rid] = a["Pid"]
    return out


def wait_replicas(n: int, app: str = "kvstrata", timeout: float = 180) -> dict[str, int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = replica_pids(app)
        if len(pids) >= n:
            return pids
        time.sleep(0.5)
    raise AssertionError(f"expected {n} live replicas, have {replica_pids(app)}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Ray + Serve on a free port and a local redis-server; yields a deploy(opts, cfg) function."""
    import ray
    from ray import serve

    from kvstrata.cluster.launch import APP_NAME, build_app, worker_env
    from kvstrata.cluster.redis_local import LocalRedis

    base = tmp_path_factory.mktemp("cluster")
    home = base / "home"
    home.mkdir()
    old_home = os.environ.get("KVSTRATA_HOME")
    os.environ["KVSTRATA_HOME"] = str(home)  # the replicas' calibration and tokenizer caches
    redis = LocalRedis().start()
    port = free_port()
    ray.init(num_cpus=4, object_store_memory=128 << 20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    counter = [0]

    def deploy(opts, cfg, **kw) -> Deployed:
        counter[0] += 1
        store = str(base / f"sessions-{counter[0]}.db")
        prefix = f"kvstrata:test{counter[0]}:"
        try:
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - nothing deployed yet
            pass
        app = build_app(opts, cfg, store=store, redis_url=redis.url, model_names=["tiny", "default"],
                        events_prefix=prefix, **kw)
        serve.run(app, name=APP_NAME, route_prefix="/")
        return Deployed(f"http://127.0.0.1:{port}", store, redis.url, APP_NAME)

    try:
        yield deploy
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            redis.stop()
            if old_home is None:
                os.environ.pop("KVSTRATA_HOME", None)
            else:
                os.environ["KVSTRATA_HOME"] = old_home


def session_turn(url: str, sid: str, text: str, max_tokens: int = 16) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{sid}/generate", timeout=180,
                      json={"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                            "temperature": 0})


def served_by(resp) -> str:
    return resp.headers["x-kvstrata-replica"]


REPO = Path(__file__).resolve().parents[2]
