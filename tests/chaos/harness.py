"""The chaos suite's moving parts: the server as a real process that can be SIGKILLed and restarted on the
same port, store and tiers; a sampler of its RSS / fds / threads; the tally every client writes to; an
HTTP helper that retries what a real client retries (connection lost, 429, 503) and counts the rest."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
RETRYABLE_503 = ("store_unavailable", "shutting_down")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChaosServer:
    """`kvstrata serve` on a fixed port: SQLite store (short busy timeout, so a held lock is an outage),
    disk tier written through, the given Redis; `up` is set while it answers /health."""

    def __init__(self, model: str, workdir: Path, redis_url: str, *, extra: tuple[str, ...] = ()) -> None:
        self.workdir, self.port = workdir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "sessions.db"
        self.kv_dir = workdir / "kv"
        self.args = ["--model", model, "--served-model-name", "chaos", "--kv-device-bytes", "24M",
                     "--kv-host-bytes", "8M", "--kv-disk-dir", str(self.kv_dir), "--kv-write-policy", "write-through",
                     "--kv-redis-url", redis_url, "--session-store", f"sqlite:///{self.db}?busy_timeout_s=1",
                     "--max-waiting", "64", *extra]
        self.proc: subprocess.Popen | None = None
        self.up = threading.Event()
        self.starts = 0
        self.log_path = workdir / "server.log"

    def start(self, timeout: float = 120) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TOKENIZERS_PARALLELISM="false")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvstrata.cli.main", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), *self.args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.starts += 1
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code in (200, 503):
                    self.up.set()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        self.up.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        self.up.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class ProcSampler(threading.Thread):
    """Every `every_s`: the server's RSS (MiB), open fds and threads, from /proc (restarts included)."""

    def __init__(self, server: ChaosServer, every_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="chaos-sampler")
        self.server, self.every_s = server, every_s
        self.samples: list[tuple[float, int, float, int, int]] = []  # (t, start no., rss MiB, fds, threads)
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.time()
        while not self._halt.wait(self.every_s):
            pid = self.server.pid
            if pid is None:
                continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                rss = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS"))) / 1024
                threads = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Threads")))
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, StopIteration, ValueError):
                continue
            self.samples.append((time.time() - t0, self.server.starts, rss, fds, threads))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def summary(self, since_s: float = 0.0) -> dict[str, Any]:
        """Per metric: first, peak and last of the last process's samples after `since_s` (the soak)."""
        last = max((s[1] for s in self.samples), default=0)
        xs = [s for s in self.samples if s[1] == last and s[0] >= since_s]
        if not xs:
            return {}
        return {name: {"first": xs[0][i], "peak": max(x[i] for x in xs), "last": xs[-1][i]}
                for i, name in ((2, "rss_mib"), (3, "fds"), (4, "threads"))}


@dataclass
class Tally:
    """What the clients saw. lost / duplicated / wrong are filled by the final check against the store."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "ok": 0, "connection_errors": 0, "retried_429": 0, "retried_503_outage": 0,
        "server_errors": 0, "client_errors": 0, "cancelled_by_client": 0, "lost": 0, "duplicated": 0, "wrong": 0,
        "turns": 0, "job_tasks": 0})
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1, note: str | None = None) -> None:
        with self.lock:
            self.counts[key] += n
            if note and len(self.notes) < 50:
                self.notes.append(note)


def call(server: ChaosServer, tally: Tally, method: str, path: str, *, json: Any = None, idempotent: bool = True,
         give_up_s: float = 240, **kw) -> httpx.Response | None:
    """One request as a careful client makes it. 429 and 503 store_unavailable changed nothing: waited
    out and retried. A lost connection (a SIGKILL) or another 5xx (counted as a server error) is retried
    when the request is idempotent; otherwise None is returned and the caller checks what happened."""
    deadline = time.time() + give_up_s
    while time.time() < deadline:
        server.up.wait(give_up_s)
        tally.add("requests")
        try:
            r = httpx.request(method, server.url + path, json=json, timeout=120, **kw)
        except httpx.HTTPError:
            tally.add("connection_errors")
            time.sleep(0.2)
            if idempotent:
                continue
            return None
        code = None
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
            code = (r.json().get("error") or {}).get("code")
        if r.status_code == 429:
            tally.add("retried_429")
            time.sleep(0.2)
            continue
        if r.status_code == 503 and code in RETRYABLE_503:
            tally.add("retried_503_outage")
            time.sleep(0.3)
            continue
        if r.status_code >= 500:
            tally.add("server_errors", note=f"{method} {path}: {r.status_code} {r.text[:200]}")
            time.sleep(0.2)
            if idempotent:
                continue
            return None
        if r.status_code < 400:
            tally.add("ok")
        return r  # a 4xx is the caller's to judge (a 409 is part of the session protocol)
    raise TimeoutError(f"{method} {path}: no answer in {give_up_s} s")
