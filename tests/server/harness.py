"""Test harness for the HTTP tests: uvicorn in a background thread on a free 127.0.0.1 port (real sockets,
driven by the official `openai` client), or `kvstrata serve` in a subprocess for kill/restart tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """One app served by uvicorn in a thread; `.url` is its base URL (http://127.0.0.1:PORT)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = app
        cfg = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    @property
    def state(self):
        return self.app.state.kv

    def client(self, api_key: str = "none", **kw):
        import openai

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, **kw)

    def engine_call(self, fn, timeout: float = 30):
        """Run fn(engine) on the engine thread and return its result."""
        return self.state.aengine.call(fn).result(timeout)


def slow_engine_steps(aengine, seconds: float = 0.01):
    """Make every engine step take at least `seconds` (a test of what happens while requests run must
    not pass or fail by the tiny model finishing first); returns the function that undoes it."""
    def install(e):
        orig = e.runner.execute

        def slowed(so):
            time.sleep(seconds)
            return orig(so)
        e.runner.execute = slowed

    aengine.call(install).result(30)
    return lambda: aengine.call(lambda e: e.runner.__dict__.pop("execute")).result(30)


def make_engine(model: str, **kw):
    from kvstrata.engine.async_engine import AsyncEngine
    from kvstrata.engine.llm_engine import LLMEngine

    max_waiting = kw.pop("max_waiting", 256)
    kw.setdefault("kv_device_bytes", "16M")
    return AsyncEngine(LLMEngine(model=model, **kw), max_waiting=max_waiting)


def serve(aengine, store, names=("tiny",), **kw) -> ServerThread:
    from kvstrata.server import create_app

    return ServerThread(create_app(aengine, store, model_names=list(names), **kw))


# ---------------------------------------------------------------------------------------------- subprocess


class ServerProcess:
    """`python -m kvstrata.cli.main serve ...` in a subprocess, with its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.env = list(args), env  # (to start the same server again)
        self.log_path = log_path
        e = dict(os.environ, PYTHONPATH=str(REPO / "src"), TOKENIZERS_PARALLELISM="false", **(env or {}))
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstrata.cli.main", "--log-level", "INFO", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=e, cwd=REPO)

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def close(self) -> None:
        self.kill()
        try:
            self.proc.wait(30)
        finally:
            self.log.close()
