"""Build the llama.cpp peer once into ``$KVSTRATA_HOME/peers`` (and, on request, the llama-cpp-python bindings).

Steps (each skipped when its output already exists; a stamp file makes a full rerun instant):

1. ``pip download --no-binary :all: --no-deps llama-cpp-python==<pinned>`` (the sdist vendors llama.cpp)
2. extract it into the cache directory
3. CMake-configure ``vendor/llama.cpp`` for the CPU (no CURL, no OpenSSL, no web-UI download, static
   libraries, native CPU flags) and build the targets ``llama-server`` and ``llama-bench`` with ``-j2``
   under ``nice``; where the CPU lists AMX but a probe's tile instruction faults (a VM), without AMX
4. only with ``--bindings`` (or ``KVSTRATA_PEER_BINDINGS=1``): build a wheel of the llama-cpp-python
   bindings from the same sdist (``CMAKE_ARGS`` CPU-only, without AMX where it faults, cached apart
   from a wheel with it) once into the cache, then ``pip install``
   it into the running interpreter's environment. Off by default: the wheel compiles ggml and
   libllama a second time (about 11.5 minutes on 2 cores, on top of about 7.5 for the binaries)
   and no benchmark needs it; once built, the cached wheel installs in a second.

Usage: ``python -m benchmarks.peers.prepare [--bindings] [--force] [--jobs 2]``
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.peers.common import (
    LLAMA_CPP_COMMIT,
    LLAMA_CPP_PYTHON_VERSION,
    PeerMissingError,
    cache_dir,
    nice_prefix,
    stamp_path,
)

logger = logging.getLogger(__name__)

# CPU-only configuration of the vendored llama.cpp. LLAMA_USE_PREBUILT_UI=OFF stops the server's
# build from downloading its web UI from Hugging Face; the API endpoints do not need it.
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
]
TARGETS = ["llama-server", "llama-bench"]
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# Executes one AMX tile instruction after asking the kernel for the tile state (ARCH_REQ_XCOMP_PERM).
AMX_PROBE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023, 18)) return 2;
    struct { uint8_t palette, start; uint8_t r[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed)) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1; cfg.colsb[0] = 64; cfg.rows[0] = 16;
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
"""


@functools.lru_cache(maxsize=1)
def amx_faults() -> bool:
    """True where the CPU lists AMX but its tile instructions fault. Seen on a VM (Xeon, kernel 6.18)
    whose kernel grants the tile permission but where `tilezero` raises SIGILL: -march=native then builds
    llama.cpp's AMX kernels, and llama-server dies at its first matrix product."""
    from benchmarks.common import cpu_info

    cc = shutil.which("cc") or shutil.which("gcc")
    if "amx_tile" not in cpu_info("flags").split() or cc is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "amx.c", Path(d) / "amx"
        src.write_text(AMX_PROBE)
        if subprocess.run([cc, "-O1", "-mamx-tile", str(src), "-o", str(exe)], capture_output=True).returncode:
            return False  # a compiler without AMX support builds no AMX kernels either
        return subprocess.run([str(exe)], capture_output=True).returncode != 0


def cmake_options(amx: str) -> list[str]:
    """CMAKE_OPTIONS; with `amx` "off" (`amx_faults`) the AMX instructions -march=native would enable
    turned off (explicit -mno- flags win over -march's, in either order)."""
    if amx != "off":
        return list(CMAKE_OPTIONS)
    say("this CPU lists AMX but its tile instructions fault here: building llama.cpp without AMX")
    return [*CMAKE_OPTIONS, f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
BINDINGS_CMAKE_ARGS = ("-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF "
                       "-DLLAVA_BUILD=OFF")  # no multimodal library: the benchmarks do not use it


def bindings_cmake_args(amx: str) -> str:
    """CMAKE_ARGS of the bindings' wheel (split like a shell line by its build backend); with `amx` "off"
    the same -mno-amx flags as the binaries'."""
    if amx != "off":
        return BINDINGS_CMAKE_ARGS
    return f"{BINDINGS_CMAKE_ARGS} '-DCMAKE_C_FLAGS={NO_AMX}' '-DCMAKE_CXX_FLAGS={NO_AMX}'"


def say(msg: str) -> None:
    print(f"[bench-peers] {msg}", flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, log: Path | None = None) -> float:
    """Run `cmd`, streaming nothing but writing its output to `log`; returns seconds. Raises on failure."""
    say("$ " + shlex.join(cmd))
    t0 = time.monotonic()
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    dt = time.monotonic() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise PeerMissingError(f"command failed ({proc.returncode}) after {dt:.0f}s: {shlex.join(cmd)}\n{tail}")
    say(f"  done in {dt:.0f}s")
    return dt


def download_sdist(root: Path, version: str) -> Path:
    sdist_dir = root / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if sdist.is_file():
        say(f"sdist present: {sdist}")
        return sdist
    sdist_dir.mkdir(parents=True, exist_ok=True)
    say(f"downloading llama-cpp-python=={version} source distribution (~75 MB)")
    run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         f"llama-cpp-python=={version}", "-d", str(sdist_dir)], log=root / "logs" / "download.log")
    if not sdist.is_file():
        raise PeerMissingError(f"pip download did not produce {sdist}; see {root / 'logs' / 'download.log'}")
    return sdist


def extract(root: Path, sdist: Path, version: str) -> Path:
    src = root / "src" / f"llama_cpp_python-{version}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        say(f"sources present: {src}")
        return src
    say(f"extracting {sdist.name}")
    (root / "src").mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "src", filter="data")
    return src


def build_llamacpp(root: Path, src: Path, version: str, jobs: int, amx: str = "native") -> tuple[dict, list[list[str]], float]:
    llama_src = src / "vendor" / "llama.cpp"
    options = cmake_options(amx)
    build = root / "build" / (f"llama.cpp-{version}" + ("-noamx" if amx == "off" else ""))
    log = root / "logs" / "build.log"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(llama_src), "-B", str(build), *gen, *options]
    compile_ = [*nice_prefix(), "cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)]
    seconds = 0.0
    if not (build / "CMakeCache.txt").is_file():
        say("configuring llama.cpp (CPU only)")
        seconds += run(configure, log=log)
    say(f"compiling {', '.join(TARGETS)} with -j{jobs} under nice (several minutes on 2 cores; log: {log})")
    seconds += run(compile_, log=log)
    binaries = {t: str(build / "bin" / t) for t in TARGETS}
    for t, p in binaries.items():
        if not Path(p).is_file():
            raise PeerMissingError(f"build finished but {p} is missing; see {log}")
    return binaries, [configure, compile_], seconds


def bindings_installed(version: str) -> bool:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("llama_cpp_python") == version
    except Exception:  # PackageNotFoundError and friends
        return False


def install_bindings(root: Path, sdist: Path, version: str, jobs: int, amx: str = "native",
                     reinstall: bool = False) -> tuple[list[list[str]], float]:
    """Build the wheel once into the cache (CPU-only CMAKE_ARGS; without AMX, in a directory of its own,
    where `amx` is "off"), then pip-install it (again, with `reinstall`: bindings built for the other
    AMX setting are installed)."""
    wheels = root / ("wheels-noamx" if amx == "off" else "wheels")
    log = root / "logs" / "bindings.log"
    cmds: list[list[str]] = []
    seconds = 0.0
    wheel = next(iter(sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))), None)
    if wheel is None:
        args = bindings_cmake_args(amx)
        env = dict(os.environ, CMAKE_ARGS=args, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
        say(f"building the llama-cpp-python wheel (CMAKE_ARGS={args!r}; minutes; log: {log})")
        cmd = [*nice_prefix(), sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(sdist)]
        seconds += run(cmd, env=env, log=log)
        cmds.append(cmd)
        wheel = next(iter(sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))), None)
        if wheel is None:
            raise PeerMissingError(f"pip wheel produced no wheel in {wheels}; see {log}")
    if reinstall or not bindings_installed(version):
        # its runtime deps (numpy, jinja2, typing-extensions, diskcache) are small; numpy/jinja2 already here
        cmd = [sys.executable, "-m", "pip", "install", "-q", *(["--force-reinstall", "--no-deps"] if reinstall else []),
               str(wheel)]
        seconds += run(cmd, log=log)
        cmds.append(cmd)
    else:
        say(f"llama-cpp-python {version} bindings already installed")
    return cmds, seconds


def prepare(*, bindings: bool = False, force: bool = False, jobs: int = 2,
            version: str = LLAMA_CPP_PYTHON_VERSION) -> dict:
    """Build what is missing and return the stamp (also written to `stamp_path(version)`)."""
    root = cache_dir()
    stamp_file = stamp_path(version)
    amx = "off" if amx_faults() else "native"  # a build with AMX where it faults is rebuilt without
    old_amx = None
    if stamp_file.is_file() and not force:
        stamp = json.loads(stamp_file.read_text())
        old_amx = stamp.get("amx", "native") if stamp.get("bindings") else None
        if all(Path(p).is_file() for p in stamp["binaries"].values()) and stamp.get("amx", "native") == amx and (
            not bindings or bindings_installed(version)
        ):
            say(f"llama.cpp peer {version} ready (cached in {root}; --force rebuilds)")
            return stamp
    (root / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sdist = download_sdist(root, version)
    src = extract(root, sdist, version)
    binaries, build_cmds, build_s = build_llamacpp(root, src, version, jobs, amx)
    stamp = {
        "llama_cpp_python": version,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "binaries": binaries,
        "amx": amx,
        "build_commands": [shlex.join(c) for c in build_cmds],
        "build_seconds": round(build_s, 1),
        "compiler": (subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
                     if shutil.which("c++") else []),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "bindings": None,
    }
    if bindings:
        cmds, b_s = install_bindings(root, sdist, version, jobs, amx, reinstall=old_amx not in (None, amx))
        stamp["bindings"] = {"version": version, "commands": [shlex.join(c) for c in cmds], "seconds": round(b_s, 1)}
    stamp["total_seconds"] = round(time.monotonic() - t0, 1)
    stamp_file.write_text(json.dumps(stamp, indent=2))
    say(f"llama.cpp peer {version} (llama.cpp@{LLAMA_CPP_COMMIT}) ready in {stamp['total_seconds']:.0f}s: "
        f"{binaries['llama-server']}")
    return stamp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bindings", action="store_true",
                    default=os.environ.get("KVSTRATA_PEER_BINDINGS", "") not in ("", "0"),
                    help="also build (once, ~11 min on 2 cores) and install the llama-cpp-python bindings")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamp file exists")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare(bindings=args.bindings, force=args.force, jobs=args.jobs)
    except PeerMissingError as exc:
        print(f"[bench-peers] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
