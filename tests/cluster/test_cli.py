"""`kvstrata serve --replicas 2` as a user runs it: a local Ray instance and redis-server of its own, the
openai client against it, SIGTERM stops everything (Ray, the replicas, the redis-server)."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest

from tests.server.harness import ServerProcess

pytestmark = pytest.mark.slow


def log(srv: ServerProcess) -> str:
    srv.log.flush()
    return srv.log_path.read_text(errors="replace")


def test_serve_replicas_runs_and_stops_cleanly(tiny_llama, tmp_path):
    srv = ServerProcess(["--model", str(tiny_llama), "--replicas", "2", "--replica-cpus", "0",
                         "--kv-device-bytes", "4M", "--num-threads", "1", "--object-store-bytes", "96M",
                         "--served-model-name", "tiny", "--session-store", str(tmp_path / "s.db")],
                        tmp_path / "serve.log", env={"OMP_NUM_THREADS": "1"})
    try:
        srv.wait_ready(timeout=240)
        deadline = time.time() + 60  # /health answers as soon as the ingress does; the banner follows
        while "cluster of 2 replicas" not in log(srv) and time.time() < deadline:
            time.sleep(0.2)
        assert "cluster of 2 replicas" in log(srv)
        redis = [int(line.split("pid ")[1].rstrip(")")) for line in log(srv).splitlines()
                 if "local redis-server on" in line]
        assert redis
        c = httpx.Client(base_url=srv.url, timeout=120)
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4})
        assert r.status_code == 200 and r.headers["x-kvstrata-replica"]
        assert c.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code in (400, 404)
        assert "kvstrata_cluster_route_decisions_total{" in c.get("/metrics").text  # a decision counted
        srv.kill(signal.SIGTERM)
        assert srv.proc.wait(120) == 0, srv.output()
        assert "stopping the cluster" in log(srv)
        time.sleep(1)
        for pid in redis:
            assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0  # gone
    finally:
        srv.close()
