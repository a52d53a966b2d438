"""What happened to each session's KV, as this process saw it: per session, its turns' prompt tokens
computed vs restored (by the place they came from: the device prefix cache or a tier), the bytes its KV
moved down (parks and pauses: written then, or already there by write-behind) and up (restores), and the time it spent parked or moved down.

SessionKV records parks and resumes, the server's turn function records turns; `GET /v1/sessions/{id}`
and the status page read `get(id)`. Counted since this process started (not kept in the session store).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Life:
    turns: int = 0
    computed_tokens: int = 0
    restored_tokens: dict[str, int] = field(default_factory=dict)  # place -> tokens loaded, not computed
    bytes_down: int = 0  # placed in a tier by parks and pauses (written then, or already there by write-behind)
    bytes_up: int = 0  # loaded back from a tier (device prefix-cache hits move nothing)
    parked_s: float = 0.0
    parked_since: float | None = None
    parks: int = 0
    prefetched: tuple[str, int] | None = None  # (tier, tokens) loaded into device memory at a resume


class SessionStats:
    """Per-session KV accounting (thread-safe; the engine thread and the event loop both write)."""

    def __init__(self, max_sessions: int = 10_000) -> None:
        self._lives: dict[str, _Life] = {}
        self._lock = threading.Lock()
        self.max_sessions = max_sessions

    def _life(self, sid: str) -> _Life:
        life = self._lives.get(sid)
        if life is None:
            if len(self._lives) >= self.max_sessions:  # forget the oldest
                self._lives.pop(next(iter(self._lives)))
            life = self._lives[sid] = _Life()
        return life

    def turn(self, sid: str, computed: int, restored_by_place: dict[str, int], bytes_per_token: int) -> None:
        """A turn ran: `computed` prompt tokens computed, the rest restored from each place."""
        with self._lock:
            life = self._life(sid)
            life.turns += 1
            life.computed_tokens += computed
            restored_by_place = dict(restored_by_place)
            if life.prefetched is not None:  # device hits a resume had just loaded came from that tier
                tier, n = life.prefetched
                moved = min(n, restored_by_place.get("device", 0))
                if moved:
                    restored_by_place["device"] -= moved
                    restored_by_place[tier] = restored_by_place.get(tier, 0) + moved
                life.prefetched = None
            for place, n in restored_by_place.items():
                life.restored_tokens[place] = life.restored_tokens.get(place, 0) + n
                if place != "device":
                    life.bytes_up += n * bytes_per_token

    def moved_down(self, sid: str, nbytes: int) -> None:
        """The session's KV was written to a tier and its device copies may go: parked from now."""
        with self._lock:
            life = self._life(sid)
            life.bytes_down += nbytes
            life.parks += 1
            if life.parked_since is None:
                life.parked_since = time.time()

    def came_back(self, sid: str, tier: str | None = None, prefetched_tokens: int = 0) -> None:
        """The session resumed (`prefetched_tokens` loaded back from `tier`): the time since it was moved
        down counts as parked, and its next turn's device hits on those tokens count as restored from
        `tier`."""
        with self._lock:
            life = self._lives.get(sid)
            if life is None:
                return
            if life.parked_since is not None:
                life.parked_s += time.time() - life.parked_since
                life.parked_since = None
            if tier and prefetched_tokens:
                life.prefetched = (tier, prefetched_tokens)

    def get(self, sid: str) -> dict[str, Any]:
        with self._lock:
            life = self._lives.get(sid) or _Life()
            parked = life.parked_s + (time.time() - life.parked_since if life.parked_since is not None else 0.0)
            restored = dict(life.restored_tokens)
            return {"turns": life.turns, "computed_tokens": life.computed_tokens, "restored_tokens": restored,
                    "recompute_avoided_tokens": sum(restored.values()), "bytes_moved_down": life.bytes_down,
                    "bytes_restored": life.bytes_up, "parks": life.parks, "parked_s": round(parked, 3)}
