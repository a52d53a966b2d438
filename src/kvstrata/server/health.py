"""GET /health: the engine thread and the session store, as a load balancer needs to know them.

200 `{"status": "ok" | "draining", "model", "store": "ok"}` when both work; 503 with code
`engine_dead` once the engine thread died (every generation would fail), or `store_unavailable`
while the session store cannot be read, or failed a request's read or write within the last
RECENT_FAILURE_S (a full disk still reads fine; sessions, responses and jobs answer 503 meanwhile;
chat and completions still serve). The store is probed with one cheap read at most every
PROBE_EVERY_S, one probe at a time and at most PROBE_TIMEOUT_S waited for, so a hung database never
piles up threads or holds a health check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kvstrata.server.errors import RETRY_AFTER_S, APIError

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 2.0
RECENT_FAILURE_S = 10.0


class StoreHealth:
    def __init__(self) -> None:
        self.ok = True
        self.checked = float("-inf")
        self._probe: asyncio.Future | None = None

    async def check(self, store) -> bool:
        failed_at = store.failed_at
        if failed_at is not None and time.monotonic() - failed_at < RECENT_FAILURE_S:
            return False
        if time.monotonic() - self.checked < PROBE_EVERY_S:
            return self.ok
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(asyncio.to_thread(store.schema_version))
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), PROBE_TIMEOUT_S)
            ok = True
        except asyncio.TimeoutError:
            ok, why = False, f"no answer in {PROBE_TIMEOUT_S:g} s"
        except Exception as e:  # what failed is logged, not shown
            ok, why = False, str(e)
        if not ok and self.ok:
            log.error("health: the session store is unavailable: %s", why)
        elif ok and not self.ok:
            log.warning("health: the session store answers again")
        self.ok, self.checked = ok, time.monotonic()
        return ok


async def health_body(st: Any) -> dict[str, Any]:
    dead = st.aengine._dead
    if dead is not None:
        raise APIError(503, f"the engine stopped: {dead!r}", code="engine_dead")
    if not await st.store_health.check(st.store):
        raise APIError(503, "the session store is unavailable: sessions, responses and jobs answer 503 until it is "
                       "back; chat and completions still serve", code="store_unavailable",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    return {"status": "draining" if st.draining else "ok", "model": st.model_id, "store": "ok"}
