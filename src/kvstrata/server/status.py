"""The status page: `GET /status` serves one plain HTML file (static/status.html: no build step, no CDN)
whose script polls the JSON below every second and draws it.

    GET /status/api/overview   the device pool and every KV tier (blocks, bytes, capacity), the caller's
                               latest sessions (state, where their KV is now, what their turns computed
                               and restored, bytes moved, time parked), jobs and their progress, and the
                               recent requests (server/access.py)

Like every route it needs a key when keys are configured (the page asks for one and keeps it in the
browser's localStorage); a caller sees only its own sessions and jobs.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from kvstrata.server.state import ServerState, get_state, owner

router = APIRouter(tags=["ops"])
SESSIONS_SHOWN = 20
JOBS_SHOWN = 10


@router.get("/status", response_class=HTMLResponse, include_in_schema=False)
async def status_page() -> HTMLResponse:
    html = resources.files("kvstrata.server").joinpath("static/status.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


def _tiers(kv: dict[str, Any]) -> list[dict[str, Any]]:
    dev = kv["device"]
    out = [{"name": "device", "blocks": dev["in_use"] + dev["cached"], "capacity_blocks": dev["total"],
            "in_use": dev["in_use"], "cached": dev["cached"]}]
    for name, t in (kv.get("tiers") or {}).items():
        out.append({"name": name, "blocks": t.get("blocks"), "bytes": t.get("bytes"),
                    "capacity_bytes": t.get("capacity_bytes"), "hits": t.get("hits"), "misses": t.get("misses"),
                    "bytes_read": t.get("bytes_read"), "bytes_written": t.get("bytes_written")})
    return out


async def _sessions(st: ServerState, who: Any) -> list[dict[str, Any]]:
    page = await st.db(st.store.list_sessions, owner=who, limit=SESSIONS_SHOWN, order="desc")
    out = []
    for s in page.items:
        full = await st.db(st.store.get_session, s.id, owner=who)
        out.append({"id": s.id, "state": s.state.value, "num_tokens": s.num_tokens, "parked_tier": s.parked_tier,
                    "kv_location": await st.skv.locate(full.token_ids), "kv_stats": st.skv.stats.get(s.id)})
    return out


async def _jobs(request: Request, st: ServerState, who: Any) -> list[dict[str, Any]]:
    from kvstrata.jobs.routes import server_manager

    page = await st.db(st.store.list_jobs, owner=who, limit=JOBS_SHOWN)
    mgr = server_manager(request.app)
    return [await mgr.status(j.id, owner=who) for j in page.items]


@router.get("/status/api/overview", tags=["ops"])
async def overview(request: Request, who=Depends(owner)) -> dict[str, Any]:
    st = get_state(request)
    kv = await st.aengine.call_async(lambda e: e.kv_stats())
    return {"model": st.model_id, "max_model_len": st.engine.max_model_len, "tiers": _tiers(kv),
            "running": st.aengine.num_active, "sessions": await _sessions(st, who),
            "jobs": await _jobs(request, st, who), "requests": st.recent.list()[::-1]}
