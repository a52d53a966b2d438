"""POST /v1/jobs and friends, through the ready-to-mount router on a bare FastAPI app."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from kvstrata.jobs import JobManager
from kvstrata.jobs.routes import router
from kvstrata.sessions.kv import SessionKV


def _app(aeng, store, manager=True):
    app = FastAPI()
    app.include_router(router)
    if manager:
        app.state.jobs = JobManager(aeng, store)
    else:  # as on the kvstrata server: only app.state.kv (aengine, store, its SessionKV)
        app.state.kv = SimpleNamespace(aengine=aeng, store=store, skv=SessionKV(aeng, store))
    return app


def test_submit_poll_results(tiny_aeng, store):
    job = {"tools": [{"python": "jobs_sample_tools:pick"}],
           "tasks": [{"id": "a", "user": "pick", "tools": ["pick"], "tool_choice": "required", "max_tokens": 64,
                      "max_steps": 2},
                     {"id": "b", "user": "hi", "tools": [], "max_tokens": 4}]}
    with TestClient(_app(tiny_aeng, store)) as c:
        r = c.post("/v1/jobs", json=job)
        assert r.status_code == 200, r.text
        st = r.json()
        assert st["object"] == "job" and st["num_tasks"] == 2 and st["state"] in ("queued", "running")
        job_id = st["id"]
        for _ in range(300):
            st = c.get(f"/v1/jobs/{job_id}").json()
            if st["state"] == "done":
                break
            time.sleep(0.1)
        assert st["state"] == "done" and st["tasks"]["done"] == 2 and st["completion_tokens"] > 0
        res = c.get(f"/v1/jobs/{job_id}/results").json()
        assert res["object"] == "list" and [x["task_id"] for x in res["data"]] == ["a", "b"]
        assert any(m["role"] == "tool" for m in res["data"][0]["transcript"])
        short = c.get(f"/v1/jobs/{job_id}/results", params={"include_transcript": "false"}).json()
        assert "transcript" not in short["data"][0]
        assert c.get("/v1/jobs/job_nope").status_code == 404
        assert c.get("/v1/jobs/job_nope/results").status_code == 404
        bad = c.post("/v1/jobs", json={"tasks": [{"usr": "typo"}]})
        assert bad.status_code == 400 and "unknown keys ['usr']" in bad.json()["detail"]


def test_server_mounted_router_refuses_client_chosen_code(tiny_aeng, store):
    with TestClient(_app(tiny_aeng, store, manager=False)) as c:
        r = c.post("/v1/jobs", json={"tools": [{"python": "os:system"}], "tasks": [{"user": "x"}]})
        assert r.status_code == 400 and "module paths are not allowed" in r.json()["detail"]
        r = c.post("/v1/jobs", json={"mcp_servers": [{"command": "sh"}], "tasks": [{"user": "x"}]})
        assert r.status_code == 400 and "MCP" in r.json()["detail"]


def test_the_server_resumes_unfinished_http_jobs_at_start(tiny_aeng, store):
    """A restart (or crash) leaves jobs queued or running in the store. At start the server resumes
    those clients submitted over HTTP, and leaves the job files of `kvstrata jobs run` to that command
    (their tools may be module paths, which a server must not load)."""
    import asyncio

    from kvstrata.server.app import create_app
    from kvstrata.sessions import JobState

    job = {"tasks": [{"id": "a", "user": "hi", "tools": [], "max_tokens": 4}]}
    mgr = JobManager(tiny_aeng, store)
    http_id = asyncio.run(mgr.create(job, source={"via": "http"}))
    cli_id = asyncio.run(mgr.create(job, source={"path": "/tmp/job.jsonl", "sha256": "x"}))
    store.set_job_state(http_id, JobState.RUNNING, owner=None)  # as a killed server left it
    with TestClient(create_app(tiny_aeng, store, model_names=["tiny"], resume_jobs=False)) as c:
        time.sleep(0.5)
        assert c.get(f"/v1/jobs/{http_id}").json()["state"] == "running"  # opted out: untouched
    with TestClient(create_app(tiny_aeng, store, model_names=["tiny"])) as c:
        for _ in range(300):
            st = c.get(f"/v1/jobs/{http_id}").json()
            if st["state"] == "done":
                break
            time.sleep(0.1)
        assert st["state"] == "done" and st["tasks"]["done"] == 1
        assert c.get(f"/v1/jobs/{cli_id}").json()["state"] == "queued"
        r = c.post("/v1/jobs", json=job)  # a new submission is marked as coming over HTTP
        assert store.get_job(r.json()["id"], owner=None).spec["source"] == {"via": "http"}
