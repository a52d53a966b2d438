"""Pauses of agent programs that have no stored session (EngineConfig.program_pause; sessions/kv.py).

A client's X-Session-Id or prompt_cache_key on plain completions and chat names a program the session
store does not know. Between its requests the program's KV gets the same pause as a session's turn,
kept in this process only:
    pause_program_later  a request of the program finished: pause (keep / move down / drop, the timers) its
                         prompt + output, as a "branch" of the program, off the response's path
    resume_program       a request of the program arrives: resume the paused branch its prompt continues (the
                         one sharing the longest prefix, at least half of it), learning the program's wait
A program keeps up to PROGRAM_BRANCHES paused branches (a parent and its sub-agents run beside each other);
tiers are not pinned for them (nothing would unpin a program that never returns), and the wait learned is
one for all programs (PROGRAM_TOOL: the API does not say which tool a plain completion waits on).

ProgramPauses is a part of SessionKV: it uses its engine-thread halves and timers (_pause_now, _arm,
_resume_now, _release, _cancel_timer, _engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstrata.sessions.types import ANY_OWNER

log = logging.getLogger(__name__)

PROGRAM_TOOL = "program"  # the wait learned between a stateless program's requests (ToolWaitModel key)
PROGRAM_PREFIX = "program:"  # hold / timer keys of stateless programs' branches
PROGRAM_BRANCHES = 8  # paused branches kept per program; the oldest is resumed (released) beyond
PROGRAMS_MAX = 4096  # programs with paused branches; the least recently paused is released beyond


@dataclass
class PausedBranch:
    """A stateless program's paused branch: what the pause timers read of a Session (id, token_ids)."""

    id: str
    token_ids: list[int]
    decision: dict = field(default_factory=dict)
    at: float = field(default_factory=time.time)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ProgramPauses:
    aeng: Any
    counters: dict[str, int]
    if TYPE_CHECKING:  # SessionKV's, which this is a part of
        async def _engine(self, fn) -> Any: ...
        def _pause_now(self, e, sid: str, ids: list[int], tool: str | None, wait_s: float | None) -> dict: ...
        def _resume_now(self, e, sid: str, ids: list[int], placement: dict | None, tier: str | None,
                        prefetch: bool) -> int: ...
        def _release(self, e, sid: str) -> None: ...
        def _cancel_timer(self, sid: str) -> None: ...
        def _arm(self, sess: Any, owner: Any, d: dict) -> None: ...

    def _init_programs(self) -> None:
        self._programs: OrderedDict[str, list[PausedBranch]] = OrderedDict()  # program -> paused branches
        self._pending: dict[str, set[asyncio.Task]] = {}  # program -> pauses not carried out yet
        self._branch_seq = 0

    def pause_program_later(self, program: str, ids: list[int]) -> None:
        """A request of `program` finished with the sequence `ids` (prompt + output): pause it as one of
        the program's branches, in the background (the reply does not wait); the program's next request
        waits for it (resume_program)."""
        cfg = self.aeng.engine.config
        if not (cfg.program_pause and cfg.enable_prefix_caching) or not ids:
            return
        task = asyncio.ensure_future(self._pause_program(program, list(ids)))
        pending = self._pending.setdefault(program, set())
        pending.add(task)

        def done(t: asyncio.Task) -> None:
            pending.discard(t)
            if not pending and self._pending.get(program) is pending:
                del self._pending[program]
            if not t.cancelled() and t.exception() is not None:
                log.info("program %s: pause failed (%s)", program, t.exception())

        task.add_done_callback(done)

    async def _pause_program(self, program: str, ids: list[int]) -> dict:
        self._branch_seq += 1
        b = PausedBranch(f"{PROGRAM_PREFIX}{program}#{self._branch_seq}", ids)
        b.decision = await self._engine(lambda e: self._pause_now(e, b.id, ids, PROGRAM_TOOL, None))
        if b.decision["action"] == "none":
            return b.decision
        self.counters["program_pauses"] += 1
        branches = self._programs.setdefault(program, [])
        self._programs.move_to_end(program)
        branches.append(b)
        self._arm(b, ANY_OWNER, b.decision)
        stale = branches[:-PROGRAM_BRANCHES]
        del branches[:-PROGRAM_BRANCHES]
        while len(self._programs) > PROGRAMS_MAX:
            stale += self._programs.popitem(last=False)[1]
        if stale:  # forgotten: their holds go back to the LRU (nothing is pinned for programs)
            for old in stale:
                self._cancel_timer(old.id)
            def release(e) -> None:
                for old in stale:
                    self._release(e, old.id)

            await self._engine(release)
        return b.decision

    async def resume_program(self, program: str, prompt: list[int]) -> int:
        """A request of `program` with `prompt` arrives: wait for the program's pauses still in flight,
        then resume the paused branch the prompt continues (sharing the longest prefix with it, at least
        half of the branch), prefetching what went to a tier. Returns the tokens prefetched."""
        pending = list(self._pending.get(program, ()))
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        branches = self._programs.get(program)
        if not branches:
            return 0
        shared = [_common_prefix(b.token_ids, prompt) for b in branches]
        i = max(range(len(branches)), key=shared.__getitem__)
        b = branches[i]
        if shared[i] == 0 or 2 * shared[i] < len(b.token_ids):
            return 0
        del branches[i]
        if not branches:
            self._programs.pop(program, None)
        self._cancel_timer(b.id)
        placement = {"action": b.decision.get("action"), "tool": PROGRAM_TOOL, "at": b.at}
        loaded = await self._engine(lambda e: self._resume_now(e, b.id, b.token_ids, placement, None, True))
        self.counters["program_resumes"] += 1
        self.counters["prefetched_tokens"] += loaded
        return loaded

    def paused_programs(self) -> int:
        return sum(len(v) for v in self._programs.values())
