"""Calibration of the machine the engine runs on.

Stable interface (the engine's placement decisions import it; keep signatures):
    MachineProfile                                   frozen dataclass, JSON round-trip
    calibrate(quick=False, disk_dir=None, redis_url=None) -> MachineProfile
    save_profile(profile, path=None) -> Path
    load_profile(path=None) -> MachineProfile | None  (None when no profile was saved)

Default path: $KVSTRATA_HOME/calibration.json, KVSTRATA_HOME defaulting to ~/.cache/kvstrata.

What is measured, and how:
- memory_bw_GBps: read bandwidth, a multi-threaded sum over a buffer far larger than the caches
  (torch when present, else numpy), best of several repetitions: decode reads weights and KV, it
  does not copy them;
- host_copy_GBps: a copy of the same buffer (numpy), bytes moved per second (STREAM "copy" would
  count them twice): what moving a KV block between two host buffers costs;
- matmul_fp32_GFLOPs: square fp32 matmuls with torch (the engine's compute path; imported here only),
  2 n^3 FLOPs each; numpy when torch is missing;
- disk_read_GBps / disk_write_GBps: a file written with fsync, evicted from the page cache with
  posix_fadvise(DONTNEED), then read back;
- redis_rtt_ms: median PING round trip, only when a Redis URL is given;
- checksum_GBps: XXH3-64 (xxhash) over the memory buffer: every block restored from a tier is
  checksummed with it (tiers/codec.py); crc32_GBps, zlib's CRC-32 it replaced, is read from older profiles;
- matmul_int8_GOPs: torch's x86 dynamic-quantized int8 linear (the engine's int8 prefill kernels),
  n x n, 2 n^3 operations each; None when torch's quantized engines are missing;
- redis_read_GBps: GET of 1 MB values on the given Redis (the remote tier's read path).
Fields added after version 1 are optional (None when a profile predates them).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvstrata.core import KvstrataError
from kvstrata.core import kvstrata_home

log = logging.getLogger(__name__)

PROFILE_VERSION = 2


@dataclass(frozen=True)
class MachineProfile:
    """Measured speeds of one machine. Bandwidths in GB/s (1e9 B/s), compute in GFLOP/s."""

    memory_bw_GBps: float
    host_copy_GBps: float
    matmul_fp32_GFLOPs: float
    disk_read_GBps: float
    disk_write_GBps: float
    measured_at: str  # ISO 8601, UTC
    hostname: str
    redis_rtt_ms: float | None = None
    matmul_backend: str = "torch"
    cpu_count: int = 0
    total_memory_bytes: int = 0
    disk_free_bytes: int = 0
    disk_dir: str = ""
    quick: bool = False
    version: int = PROFILE_VERSION
    crc32_GBps: float | None = None  # (profiles from before checksum_GBps)
    matmul_int8_GOPs: float | None = None
    redis_read_GBps: float | None = None
    checksum_GBps: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MachineProfile":
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is f.default_factory and f.name not in d]  # type: ignore[misc]
        if missing:
            raise KvstrataError(f"calibration profile lacks {', '.join(missing)}; run `kvstrata plan calibrate` again")
        return cls(**{k: v for k, v in d.items() if k in known})


def default_profile_path() -> Path:
    return kvstrata_home() / "calibration.json"


def save_profile(profile: MachineProfile, path: str | os.PathLike | None = None) -> Path:
    """Write the profile as JSON (atomically: temp file + rename). Returns the path written."""
    p = Path(path) if path else default_profile_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".calibration-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(profile.to_dict(), f, indent=2)
    os.replace(tmp, p)
    return p


def load_profile(path: str | os.PathLike | None = None) -> MachineProfile | None:
    """The saved profile, or None when there is none. A damaged file raises KvstrataError."""
    p = Path(path) if path else default_profile_path()
    if not p.is_file():
        return None
    try:
        return MachineProfile.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise KvstrataError(f"calibration profile {p} is damaged ({e}); run `kvstrata plan calibrate` again") from e


# ---- measurements ---------------------------------------------------------------------------
def _best_time(fn, reps: int) -> float:
    fn()  # warm-up: page faults, lazy allocation
    return min(_timed(fn) for _ in range(reps))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_memory(nbytes: int, reps: int) -> tuple[float, float]:
    """(read bandwidth GB/s, copy rate GB/s) over an `nbytes` buffer."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    t_copy = _best_time(lambda: np.copyto(dst, src), reps)
    try:
        import torch

        view = torch.from_numpy(src)
        t_read = _best_time(lambda: view.sum(), reps)
    except ImportError:
        t_read = _best_time(lambda: src.sum(), reps)
    return src.nbytes / t_read / 1e9, src.nbytes / t_copy / 1e9


def measure_matmul(n: int, seconds: float) -> tuple[float, str]:
    """(fp32 GFLOP/s, backend) from repeated n x n matmuls for about `seconds`."""
    try:
        import torch  # the engine's compute path; imported only here

        a, b = torch.randn(n, n), torch.randn(n, n)
        mm, backend = (lambda: torch.mm(a, b)), "torch"
    except ImportError:
        import numpy as np

        a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
        mm, backend = (lambda: a @ b), "numpy"
    mm()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        best = min(best, _timed(mm))
    return 2 * n**3 / best / 1e9, backend


def measure_checksum(nbytes: int, reps: int) -> float:
    """GB/s of XXH3-64, the checksum every restored KV block is verified with (tiers/codec.py)."""
    import xxhash

    buf = os.urandom(nbytes)
    return nbytes / _best_time(lambda: xxhash.xxh3_64_intdigest(buf), reps) / 1e9


def measure_matmul_int8(n: int, seconds: float) -> float | None:
    """GOP/s of torch's dynamic-quantized int8 linear (x86 engine) on n x n; None without it."""
    try:
        import torch
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    except ImportError:
        return None
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    try:
        with warnings.catch_warnings():  # torch deprecates quantized tensor creation; the engine uses it too
            warnings.simplefilter("ignore")
            lin = DynLinear(n, n, dtype=torch.qint8)
        x = torch.randn(n, n)
        lin(x)
    except (RuntimeError, NotImplementedError):
        return None
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        best = min(best, _timed(lambda: lin(x)))
    return 2 * n**3 / best / 1e9


def measure_disk(directory: Path, nbytes: int) -> tuple[float, float]:
    """(read GB/s, write GB/s) of one file in `directory`, fsync'd and dropped from the page cache."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    fd, path = tempfile.mkstemp(dir=directory, prefix=".kvstrata-disk-")
    try:
        t = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(1, nbytes >> 20)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        write = nbytes / (time.perf_counter() - t) / 1e9
        with open(path, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            while f.read(8 << 20):
                pass
            read = nbytes / (time.perf_counter() - t) / 1e9
    finally:
        os.unlink(path)
    return read, write


def measure_redis(url: str, n: int, values: int = 8) -> tuple[float, float]:
    """(median PING round trip in ms, GB/s of GET on `values` 1 MB values)."""
    import redis  # optional: only when a URL is given

    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        rtts = []
        for _ in range(n):
            t = time.perf_counter()
            client.ping()
            rtts.append((time.perf_counter() - t) * 1e3)
        keys = [f"kvstrata:calibrate:{i}" for i in range(values)]
        blob = os.urandom(1 << 20)
        for k in keys:
            client.set(k, blob, ex=60)
        t_get = _best_time(lambda: [client.get(k) for k in keys], 3)
        client.delete(*keys)
    except (redis.RedisError, OSError, ValueError) as e:
        raise KvstrataError(f"cannot reach Redis at {url} ({e}); check --redis-url") from e
    return statistics.median(rtts), values * len(blob) / t_get / 1e9


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def calibrate(quick: bool = False, disk_dir: str | os.PathLike | None = None,
              redis_url: str | None = None) -> MachineProfile:
    """Measure this machine (~10-15 s; `quick` 2-4 s with smaller buffers, for tests)."""
    mem_bytes = (64 if quick else 512) << 20
    ddir = Path(disk_dir) if disk_dir else kvstrata_home()
    log.info("calibrating memory (%d MB buffer)", mem_bytes >> 20)
    bw, copy = measure_memory(mem_bytes, reps=2 if quick else 5)
    log.info("calibrating matmul")
    gflops, backend = measure_matmul(512 if quick else 1024, 0.4 if quick else 3.0)
    int8 = measure_matmul_int8(512 if quick else 1024, 0.4 if quick else 2.0)
    check = measure_checksum(mem_bytes // 4, reps=2 if quick else 5)
    log.info("calibrating disk in %s", ddir)
    rd, wr = measure_disk(ddir, (16 if quick else 256) << 20)
    rtt, redis_bw = measure_redis(redis_url, 20 if quick else 200) if redis_url else (None, None)
    try:
        st = os.statvfs(ddir)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 0
    return MachineProfile(
        memory_bw_GBps=bw, host_copy_GBps=copy, matmul_fp32_GFLOPs=gflops, disk_read_GBps=rd, disk_write_GBps=wr,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), hostname=socket.gethostname(),
        redis_rtt_ms=rtt, matmul_backend=backend, cpu_count=os.cpu_count() or 0, total_memory_bytes=_total_memory(),
        disk_free_bytes=free, disk_dir=str(ddir), quick=quick, checksum_GBps=check,
        matmul_int8_GOPs=int8, redis_read_GBps=redis_bw,
    )
