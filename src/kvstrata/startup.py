"""Start-up phases: where the time from process start to a ready engine (and a first token) goes; and
the garbage collector paused while start-up builds its long-lived objects.

The engine records its phases (`Phases.mark`) and logs them at debug level with the time since the
process started (`--log-level debug`), so a slow start names its cause. The process start comes from
/proc/self/stat (10 ms resolution); elsewhere from the first import of this module.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

_IMPORTED_AT = time.time()


def _process_start_wall() -> float:
    """The process's start as a time.time() value: its start in clock ticks after boot (/proc/self/stat)
    against the clock since boot now. (Not /proc/stat's btime: whole seconds, so up to 1 s off.)"""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): starttime, in clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        if not 0 <= age < 3600:  # (a kernel counting otherwise: fall back)
            return _IMPORTED_AT
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT


PROCESS_START = _process_start_wall()


def since_process_start(wall: float | None = None) -> float:
    """Seconds from this process's start to `wall` (a time.time() value; default now)."""
    return (time.time() if wall is None else wall) - PROCESS_START


class Phases:
    """Named, consecutive durations: mark(name) closes the phase that ran since the previous mark."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.began_after_start = since_process_start()
        self._last = self.began
        self.durations: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.durations[name] = self.durations.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self.began

    def report(self) -> str:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in self.durations.items())
        return (f"process start to engine {self.began_after_start:.3f} s (interpreter and imports); "
                f"{parts}; ready {self.began_after_start + self.total:.3f} s after process start")


# Start-up builds over a million objects that live as long as the process (torch's operator registry,
# the tokenizer's vocabulary, pydantic's and FastAPI's models) and almost no garbage; the cyclic collector,
# run every 700 allocations, traces them again and again: 0.1-0.3 s of a 1.5 s start on a 2-core machine.
_gc_held: bool | None = None  # None: not held; else whether to freeze on release


def hold_gc(freeze: bool = True) -> None:
    """Pauses the collector for a process's start (the command line calls it first); `release_gc`, at the
    end of the engine's build, ends the pause."""
    global _gc_held
    if gc.isenabled():
        gc.disable()
        _gc_held = freeze


def release_gc() -> None:
    """Ends `hold_gc`: with `freeze`, what start-up built moves to the permanent generation (`gc.freeze`,
    so later collections skip it); the collector runs again. Nothing where `hold_gc` did not pause it.
    The cycles start-up left unreachable are frozen with the rest, never collected: ~8k objects, well
    under 1 MiB, for the default model's `generate` (collecting them first would cost ~0.1 s)."""
    global _gc_held
    if _gc_held is not None:
        if _gc_held:
            gc.freeze()
        _gc_held = None
        gc.enable()


@contextmanager
def gc_paused() -> Iterator[None]:
    """The collector off for a block (an engine's build inside any program), as it was afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
