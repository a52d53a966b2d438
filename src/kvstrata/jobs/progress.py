"""Progress a person can watch: live counters of a running job, a rich display, a final summary table.

`JobProgress` is what agents report into (plain data, no I/O). `ProgressDisplay` shows it: a rich
Live panel when the console is a terminal, else one plain log line every `every_s` seconds (and one
per finished task), so redirected output stays readable.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class JobProgress:
    job_id: str
    total: int
    done: int = 0  # finished before this run, and in it
    failed: int = 0
    started_at: float = field(default_factory=time.time)
    generated_tokens: int = 0
    phases: dict[int, str] = field(default_factory=dict)  # task index -> running / generating / tools
    live_tokens: dict[str, list[int]] = field(default_factory=dict)  # session id -> token ids (active agents)
    kv_by_tier: dict[str, int] = field(default_factory=dict)  # tokens of active sessions, by fastest tier
    placements: Counter = field(default_factory=Counter)
    finished_in_run: int = 0
    _rate: list[tuple[float, int]] = field(default_factory=list)

    def task_phase(self, index: int, phase: str, session_id: str | None = None, token_ids=None) -> None:
        if phase in ("done", "failed"):
            self.phases.pop(index, None)
            if session_id:
                self.live_tokens.pop(session_id, None)
            self.finished_in_run += 1
            if phase == "done":
                self.done += 1
            else:
                self.failed += 1
            return
        self.phases[index] = phase
        if session_id and token_ids is not None:
            self.live_tokens[session_id] = list(token_ids)

    def add_generated(self, n: int) -> None:
        self.generated_tokens += n

    def placement(self, action: Any) -> None:
        self.placements[str(action)] += 1

    # -- derived --------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return sum(1 for p in self.phases.values() if p != "tools")

    @property
    def waiting_on_tools(self) -> int:
        return sum(1 for p in self.phases.values() if p == "tools")

    @property
    def waiting(self) -> int:
        return max(0, self.total - self.done - self.failed - len(self.phases))

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds (whole run until then)."""
        now = time.time()
        self._rate.append((now, self.generated_tokens))
        while len(self._rate) > 2 and self._rate[1][0] < now - window_s:
            self._rate.pop(0)
        t0, n0 = self._rate[0]
        if now - t0 < 1e-3:
            t0, n0 = self.started_at, 0
        return (self.generated_tokens - n0) / max(now - t0, 1e-3)

    def eta_s(self) -> float | None:
        left = self.total - self.done - self.failed
        if left == 0:
            return 0.0
        if self.finished_in_run == 0:
            return None
        return (time.time() - self.started_at) / self.finished_in_run * left

    def snapshot(self) -> dict:
        return {"total": self.total, "done": self.done, "failed": self.failed, "running": self.running,
                "waiting_on_tools": self.waiting_on_tools, "waiting": self.waiting,
                "generated_tokens": self.generated_tokens, "tokens_per_s": round(self.tokens_per_s(), 2),
                "elapsed_s": round(time.time() - self.started_at, 3), "eta_s": self.eta_s(),
                "kv_tokens_by_tier": dict(self.kv_by_tier), "placements": dict(self.placements)}


def _fmt_eta(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def status_line(p: JobProgress) -> str:
    kv = ", ".join(f"{k}={v}" for k, v in sorted(p.kv_by_tier.items())) or "-"
    return (f"job {p.job_id}: {p.done}/{p.total} done, {p.failed} failed, {p.running} running, "
            f"{p.waiting_on_tools} waiting on tools, {p.waiting} waiting; {p.tokens_per_s():.1f} tok/s; "
            f"KV tokens by tier: {kv}; ETA {_fmt_eta(p.eta_s())}")


class ProgressDisplay:
    def __init__(self, progress: JobProgress, console=None, every_s: float = 5.0, live: bool | None = None) -> None:
        from rich.console import Console

        self.p = progress
        self.console = console or Console(file=sys.stderr)
        self.live_mode = self.console.is_terminal if live is None else live
        self.every_s = every_s
        self._live = None
        self._last = 0.0
        self._last_done = progress.done + progress.failed

    def _panel(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        p = self.p
        t = Table.grid(padding=(0, 2))
        t.add_row("job", p.job_id)
        t.add_row("tasks", f"{p.done} done, {p.failed} failed, {p.running} running, "
                           f"{p.waiting_on_tools} waiting on tools, {p.waiting} waiting (of {p.total})")
        t.add_row("", ProgressBar(total=max(p.total, 1), completed=p.done + p.failed, width=40))
        t.add_row("tokens/s", f"{p.tokens_per_s():.1f} generated ({p.generated_tokens} in this run)")
        kv = "  ".join(f"{k}: {v}" for k, v in sorted(p.kv_by_tier.items())) or "-"
        t.add_row("session KV", kv + " (tokens of active sessions, by fastest tier)")
        if p.placements:
            t.add_row("tool waits", "  ".join(f"{k}: {v}" for k, v in sorted(p.placements.items())))
        t.add_row("ETA", _fmt_eta(p.eta_s()))
        return t

    def start(self) -> None:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(self._panel(), console=self.console, refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self.console.print(status_line(self.p), markup=False, highlight=False, soft_wrap=True)
            self._last = time.time()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._panel())
            return
        finished = self.p.done + self.p.failed
        if time.time() - self._last >= self.every_s or finished != self._last_done:
            self.console.print(status_line(self.p), markup=False, highlight=False, soft_wrap=True)
            self._last, self._last_done = time.time(), finished

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self._panel())
            self._live.stop()
            self._live = None


def summary_table(records: list[dict], elapsed_s: float | None = None):
    """A rich Table of every task's result, with a totals row."""
    from rich.table import Table

    t = Table(title="job summary" + (f" ({elapsed_s:.1f} s)" if elapsed_s is not None else ""))
    for c in ("task", "status", "finish", "steps", "tools", "tool errors", "prompt tok", "cached tok", "gen tok", "wall s"):
        t.add_column(c, justify="right" if c not in ("task", "status", "finish") else "left")
    tot = Counter()
    for r in sorted(records, key=lambda r: r["task_index"]):
        vals = [r.get("steps") or 0, r.get("tool_calls") or 0, r.get("tool_errors") or 0, r.get("prompt_tokens") or 0,
                r.get("cached_prompt_tokens") or 0, r.get("completion_tokens") or 0]
        for k, v in zip(("steps", "tools", "errs", "p", "c", "g"), vals):
            tot[k] += v
        wall = (r.get("timings") or {}).get("wall_s")
        t.add_row(str(r.get("task_id")), str(r.get("status")), str(r.get("finish_reason")), *map(str, vals),
                  f"{wall:.1f}" if isinstance(wall, (int, float)) else "-")
    ok = sum(1 for r in records if r.get("status") == "done")
    t.add_row(f"{len(records)} tasks", f"{ok} done", "", *(str(tot[k]) for k in ("steps", "tools", "errs", "p", "c", "g")), "")
    return t
