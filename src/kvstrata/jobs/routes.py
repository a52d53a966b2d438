"""HTTP routes for agent jobs, ready to mount on the server app (`app.include_router(router)`):

    POST /v1/jobs                     a job object (docs/jobs.md) -> the job's status; it runs in the background
    GET  /v1/jobs/{id}                state, task counts, tokens, live progress
    GET  /v1/jobs/{id}/results        ?include_transcript=true: one record per finished task
    POST /v1/jobs/{id}/cancel

The routes use `request.app.state.jobs` (a JobManager). When the app has none, one is made on first
use from the server's `app.state.kv` (its `aengine` and `store`) that refuses module-path tools and MCP
commands (a client must not choose code to run on the server; tools registered through the
`kvstrata.tools` entry-point group are allowed). The owner of a job is `request.state.owner`, set by
the server's auth middleware (None without API keys). Errors are HTTPExceptions (404 unknown job,
400 bad job, e.g. past the server's job limits), which the server renders in its OpenAI error format;
a StoreUnavailable passes through to the server's handler (503).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, HTTPException, Request

from kvstrata.core import KvstrataError
from kvstrata.jobs.manager import JobManager
from kvstrata.sessions import JobNotFound, StoreUnavailable

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def server_manager(app) -> JobManager:
    """The app's JobManager: app.state.jobs, else one made (and kept there) from app.state.kv that refuses
    client-chosen code. Raises 503 when the app has neither."""
    mgr = getattr(app.state, "jobs", None)
    if mgr is None:
        st = getattr(app.state, "kv", None)
        if st is None:
            raise HTTPException(503, "this server has no job manager (set app.state.jobs)")
        limits = getattr(st, "limits", None)  # the kvstrata server's state has its limits and admission gate
        memory = getattr(st, "memory", None)
        mgr = app.state.jobs = JobManager(st.aengine, st.store, skv=st.skv, allow_python_modules=False,
                                          allow_mcp=False, limits=limits.jobs() if limits else None,
                                          admission=getattr(st, "admission", None),
                                          recall=memory.recall if memory is not None else None)
    return mgr


def get_manager(request: Request) -> JobManager:
    return server_manager(request.app)


def _owner(request: Request) -> Any:
    return getattr(request.state, "owner", None)


async def _call(coro):
    try:
        return await coro
    except JobNotFound as e:
        raise HTTPException(404, str(e)) from None
    except StoreUnavailable:  # the server's state, not the request's: the app's handler answers 503
        raise
    except KvstrataError as e:
        raise HTTPException(400, str(e)) from None


@router.post("")
async def create_job(request: Request, body: dict[str, Any] = Body(...)):
    mgr, who = get_manager(request), _owner(request)
    job_id = await _call(mgr.submit(body, owner=who, source={"via": "http"}))
    return await _call(mgr.status(job_id, owner=who))


@router.get("/{job_id}")
async def job_status(job_id: str, request: Request):
    return await _call(get_manager(request).status(job_id, owner=_owner(request)))


@router.get("/{job_id}/results")
async def job_results(job_id: str, request: Request, include_transcript: bool = True):
    data = await _call(get_manager(request).results(job_id, owner=_owner(request),
                                                    include_transcript=include_transcript))
    return {"object": "list", "data": data}


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request):
    return await _call(get_manager(request).cancel(job_id, owner=_owner(request)))
