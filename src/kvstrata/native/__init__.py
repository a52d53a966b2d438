"""Native kernels compiled on the host: the engine's step (step.c, gemm.c, attn.c).

The C sources ship with the package and are built once per source version, compiler and CPU with the
host's C compiler (`-O3 -march=native -fopenmp`, a few seconds; keyed by the sources, the compiler
binary and the CPU's flags, so later starts only load it), into $KVSTRATA_HOME/native (default
~/.cache/kvstrata/native), then loaded with ctypes. Its OpenMP runtime must be the one torch uses, so both share one thread team
instead of two fighting over the cores: torch's bundled libgomp is loaded first, by path and without
importing torch (`_share_torch_openmp`), so the step runs in a process that has not imported torch
and torch, imported later, finds the same runtime loaded. Where no compiler is available the engine keeps the torch path and says why
(`native_status()`); `KVSTRATA_NATIVE=0` turns the native path off. On CPUs with AMX (Intel since
Sapphire Rapids) int8 products of 4 rows or more (prefill chunks, draft verification, batches) run on its
tiles, with the same integer sums as VNNI so the same bits; `KVSTRATA_AMX=0` keeps them on VNNI.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCES = [HERE / "step.c", HERE / "gemm.c", HERE / "attn.c"]
HEADERS = [HERE / "kv.h"]
# -ffp-contract=off: a * b + c stays two roundings wherever the code writes it so (an FMA only where an
# intrinsic asks for one), so the C means the same arithmetic on every build.
CFLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-Wall", "-ffp-contract=off"]
# GCC may peel iterations off a vectorized loop until an array is aligned; in a reduction that makes the
# summation order depend on the buffer's address, which batch invariance cannot allow.
GCC_FLAGS = ["--param=vect-max-peeling-for-alignment=0", "--param=vect-max-version-for-alignment-checks=0"]
_status = {"available": False, "reason": "not built yet", "path": None}


def _cache_dir() -> Path:
    from kvstrata.core import kvstrata_home

    return kvstrata_home() / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compiler_identity(cc: str) -> tuple:
    """The compiler binary as it is now (resolved path, size, mtime): a new compiler gets a new build.
    A stat, not `cc --version`, so a cached start runs no subprocess."""
    path = shutil.which(cc) or cc
    try:
        st = os.stat(os.path.realpath(path))
    except OSError:
        return (path,)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def build(force: bool = False, march: str = "native") -> Path:
    """Compiles the step for this CPU (cached) and returns the shared library's path; raises on failure.
    `march` names another target (e.g. x86-64-v2, without AVX2 or AVX-512): the tests build the portable
    loops that way to check them on any machine."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    ident = _compiler_identity(cc)
    flags = CFLAGS + ([] if "clang" in os.path.basename(ident[0]) else GCC_FLAGS)
    text = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(text + repr((cc, ident, flags, march, _cpu_flags())).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "libkvstep.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # build aside, then rename: safe for concurrent builds
    os.close(fd)
    r = subprocess.run([cc, *flags, f"-march={march}", *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{cc} failed to build the native step:\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    log.info("built the native step: %s", out)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded native library, or None (with the reason in `native_status()`)."""
    if os.environ.get("KVSTRATA_NATIVE", "1") == "0":
        _status.update(available=False, reason="disabled by KVSTRATA_NATIVE=0")
        return None
    try:
        lib = load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status.update(available=False, reason=str(e))
        log.warning("native step unavailable, using the torch path: %s", e)
        return None
    _status.update(available=True, reason="", path=lib._name, vnni=bool(lib.kv_has_vnni()),
                   amx=bool(lib.kv_amx(0 if os.environ.get("KVSTRATA_AMX") == "0" else 1)))
    return lib


def _share_torch_openmp() -> None:
    """Loads the OpenMP runtime torch ships (torch/lib/libgomp*.so*) globally, without importing torch, so
    the step's own reference to libgomp.so.1 and torch's, whenever it is imported, resolve to that one
    runtime. Where torch ships none (or is loaded already) it imports torch, as before."""
    from kvstrata.core import imported

    if imported("torch") is not None:  # (half imported by another thread: its libgomp may not be loaded yet)
        return
    spec = importlib.util.find_spec("torch")
    libdir = Path(spec.origin).parent / "lib" if spec is not None and spec.origin else None
    found = sorted(libdir.glob("libgomp*.so*")) if libdir is not None and libdir.is_dir() else []
    if not found:
        import torch  # noqa: F401  (its runtime first)

        return
    ctypes.CDLL(str(found[0]), mode=ctypes.RTLD_GLOBAL)


def default_threads() -> int:
    """The step's threads when none are set: torch's intra-op count where torch is loaded; else as torch
    would choose it: OMP_NUM_THREADS, or the physical cores this process may run on."""
    from kvstrata.core import imported

    torch = imported("torch")
    return torch.get_num_threads() if torch is not None else _default_threads()


@functools.cache
def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add((None, c))
    return max(1, len(cores))


def load(march: str = "native") -> ctypes.CDLL:
    """Builds (or finds in the cache) and loads the library for `march`, with its C signatures declared."""
    path = build(march=march)
    _share_torch_openmp()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # a damaged cached build (truncated file, wrong architecture): rebuild once
        log.warning("rebuilding the native step: the cached %s does not load (%s)", path, e)
        path = build(force=True, march=march)
        lib = ctypes.CDLL(str(path))
    P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.kv_model_new.restype = P
    lib.kv_model_new.argtypes = [P, P, P, P, P, ctypes.c_size_t]
    lib.kv_model_free.argtypes = [P]
    lib.kv_has_vnni.restype = I
    lib.kv_amx.restype = I
    lib.kv_amx.argtypes = [I]
    lib.kv_model_weight_bytes.restype = ctypes.c_size_t
    lib.kv_model_weight_bytes.argtypes = [P]
    lib.kv_model_arena_mapped.restype = I
    lib.kv_model_arena_mapped.argtypes = [P]
    lib.kv_step.restype = I
    lib.kv_step.argtypes = [P, I, P, P, P, P, P, I, P, P, I64, I, P, P, I]
    return lib


def native_status() -> dict:
    library()
    return dict(_status)
