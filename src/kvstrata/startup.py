"""Start-up phases: where the time from process start to a ready engine (and a first token) goes; and
the garbage collector paused while start-up builds its long-lived objects.

The engine records its phases (`Phases.mark`) and logs them at debug level with the time since the
process started (`--log-level debug`), so a slow start names its cause. The process start comes from
/proc/self/stat (10 ms resolution); elsewhere from the first import of this module.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
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


def torch_may_have_cuda() -> bool:
    """Whether the installed torch could see a CUDA device, answered without importing it where it can
    be (importing torch takes ~1.1 s on a 2-core machine): a CPU-only build ships no libtorch_cuda /
    libc10_cuda. True where torch is loaded already (asking it is then cheap) or cannot be told."""
    if "torch" in sys.modules:
        return True
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return True
    from pathlib import Path

    lib = Path(spec.origin).parent / "lib"
    return not lib.is_dir() or any(lib.glob("lib*cuda*.so*"))


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


# ---- the native step's weight arena, backed by memory while torch imports ------------------------------
#
# The native step copies its int8 weights into one huge-page arena (~130 MiB for the default model). The
# kernel backs fresh huge pages on first touch, and on this kind of VM that costs 0.01-0.3 s (zeroing,
# sometimes compaction to find free 2 MiB pages): on the path to the first token. A command that builds an
# engine asks, before torch is imported, for an arena of the size the last start of the same model needed
# (a hint under $KVSTRATA_HOME/native) and a thread backs it (mmap, MADV_HUGEPAGE, MADV_POPULATE_WRITE:
# all in the kernel, the GIL released) while the main thread imports torch (~0.9 s, one core). The native
# step takes the map if it is large enough and otherwise unmaps it and allocates its own; the engine
# releases one nobody took. Linux only; anywhere else nothing happens.

_HUGE = 2 << 20
_MADV_HUGEPAGE, _MADV_POPULATE_WRITE = 14, 23
_arena: dict | None = None  # {"thread", "key", "bytes", "map": (base, length) once backed}


def arena_key(model: str, quantization: str, device: str, dtype: str) -> str:
    """What an arena size is remembered under: the engine settings that decide it (a path as its real path)."""
    path = os.path.realpath(model) if os.path.exists(model) else model
    return f"{path}|{quantization}|{device}|{dtype}"


def _hints_path():
    from kvstrata.core import kvstrata_home

    return kvstrata_home() / "native" / "arena-hints.json"


def _read_hints() -> dict:
    import json

    try:
        hints = json.loads(_hints_path().read_text())
        return hints if isinstance(hints, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_arena(key: str, nbytes: int) -> None:
    """Records the arena size an engine of these settings needed (at most 16 settings kept). A damaged or
    unwritable hints file only costs the next start its head start."""
    import json

    hints = _read_hints()
    if hints.get(key) == nbytes:
        return
    hints.pop(key, None)
    hints[key] = int(nbytes)
    hints = dict(list(hints.items())[-16:])
    path = _hints_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(hints))
        os.replace(tmp, path)
    except OSError:
        pass


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _back(state: dict, libc, memset, prot: int, flags: int, failed: int) -> None:
    """(The thread.) Maps state["bytes"] at a 2 MiB boundary (over-mapped by one huge page, the ends cut
    off) and commits it: MADV_POPULATE_WRITE (Linux 5.14), else one write per huge page. Everything it
    uses is set up by the caller, so it runs nothing but foreign calls, each with the GIL released, beside
    the main thread's import of torch."""
    n = state["bytes"]
    base = libc.mmap(None, n + _HUGE, prot, flags, -1, 0)
    if base is None or base == failed:
        return
    start = (base + _HUGE - 1) // _HUGE * _HUGE
    if start > base:
        libc.munmap(base, start - base)
    if base + _HUGE > start:
        libc.munmap(start + n, base + _HUGE - start)
    libc.madvise(start, n, _MADV_HUGEPAGE)
    if libc.madvise(start, n, _MADV_POPULATE_WRITE) != 0:
        for off in range(0, n, _HUGE):  # (one memset per huge page: the GIL is released in each)
            memset(start + off, 0, min(_HUGE, n - off))
    state["map"] = (start, n)


def prefault_arena(key: str) -> bool:
    """Starts backing an arena of the size remembered for `key` in a thread; False when there is no hint
    (a first start), the platform has no such calls, or the native step is turned off."""
    global _arena
    if _arena is not None or not sys.platform.startswith("linux") or os.environ.get("KVSTRATA_NATIVE", "1") == "0":
        return False
    nbytes = _read_hints().get(key)
    if not isinstance(nbytes, int) or nbytes <= 0:
        return False
    import ctypes
    import mmap
    import threading

    nbytes = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE  # (whole pages, whatever the file says)

    state = {"key": key, "bytes": nbytes, "map": None}
    args = (state, _libc(), ctypes.memset, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            ctypes.c_void_p(-1).value)
    state["thread"] = threading.Thread(target=_back, args=args, name="kvstrata-arena", daemon=True)
    state["thread"].start()
    _arena = state
    return True


def take_arena() -> tuple[int, int, float]:
    """The backed map (base, length) for the native step to own, and the seconds spent waiting for the
    thread; (0, 0, wait) when there is none. It is handed out once."""
    global _arena
    state, _arena = _arena, None
    if state is None:
        return 0, 0, 0.0
    t0 = time.perf_counter()
    state["thread"].join()
    waited = time.perf_counter() - t0
    base, length = state["map"] or (0, 0)
    return base, length, waited


def unmap(base: int, length: int) -> None:
    _libc().munmap(base, length)


def discard_arena() -> None:
    """Unmaps a backed arena nobody took (the native step did not run)."""
    base, length, _ = take_arena()
    if base:
        unmap(base, length)
