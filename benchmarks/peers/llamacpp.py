"""Drive the llama.cpp peer: `llama-bench` for single-stream speed, `llama-server` for HTTP workloads.

Every call records the exact command line it ran (``.command`` / ``"command"``), so the results file
can show how each number was produced. The binaries come from the stamp `prepare` wrote; if they are
missing, `PeerMissingError` says to run `make bench-peers`.
"""

from __future__ import annotations

import json
import logging
import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.peers.common import PeerMissingError, binary, load_stamp, wait_healthy

logger = logging.getLogger(__name__)

DEFAULT_THREADS = 2


# ---------------------------------------------------------------------------------------------
# llama-bench


def llama_bench(gguf: Path, *, n_prompt: list[int] | None = None, n_gen: list[int] | None = None,
                depth: list[int] | None = None, reps: int = 2, threads: int = DEFAULT_THREADS,
                warmup: bool = True, extra: list[str] | None = None, timeout: float = 1800) -> dict:
    """Run ``llama-bench -o json`` once; returns {"command": str, "records": [llama-bench JSON rows]}.

    Each row carries n_prompt, n_gen, n_depth, avg_ts (tokens/s), stddev_ts, samples_ts, build_commit,
    cpu_info, model_type, n_threads, flash_attn, ... as llama-bench reports them. llama-bench runs
    every combination of the lists given; `depth` (``-d``) prefills that many tokens untimed before
    each timed test, so ``n_prompt=[0], n_gen=[128], depth=[4096]`` is decode speed at 4,096 tokens of
    context. Note a warmup prompt run costs a full prefill of n_prompt tokens.
    """
    cmd = [str(binary("llama-bench")), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json"]
    cmd += ["-p", ",".join(map(str, n_prompt if n_prompt is not None else [0]))]
    cmd += ["-n", ",".join(map(str, n_gen if n_gen is not None else [0]))]
    if depth:
        cmd += ["-d", ",".join(map(str, depth))]
    if not warmup:
        cmd.append("--no-warmup")
    cmd += list(extra or [])
    logger.info("$ %s", shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise PeerMissingError(f"llama-bench failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-2000:]}")
    return {"command": shlex.join(cmd), "records": parse_bench_json(proc.stdout)}


def parse_bench_json(text: str) -> list[dict]:
    """llama-bench ``-o json`` prints one JSON array; tolerate log lines before it."""
    start = text.find("[")
    if start < 0:
        raise ValueError(f"no JSON array in llama-bench output: {text[:500]!r}")
    rows = json.loads(text[start:])
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "avg_ts" in r for r in rows):
        raise ValueError("llama-bench JSON rows must be objects with avg_ts")
    return rows


def prefill_tps(gguf: Path, n_tokens: int, **kw) -> dict:
    """Prefill (prompt processing) tokens/s for an `n_tokens` prompt from an empty cache."""
    out = llama_bench(gguf, n_prompt=[n_tokens], n_gen=[0], **kw)
    row = out["records"][0]
    return {"tokens": n_tokens, "tps": row["avg_ts"], "stddev": row["stddev_ts"], "command": out["command"], "raw": row}


def decode_tps(gguf: Path, depth: int, n_gen: int = 128, **kw) -> dict:
    """Decode tokens/s generating `n_gen` tokens after `depth` tokens of context (``-d``)."""
    out = llama_bench(gguf, n_prompt=[0], n_gen=[n_gen], depth=[depth], **kw)
    row = out["records"][0]
    return {"depth": depth, "n_gen": n_gen, "tps": row["avg_ts"], "stddev": row["stddev_ts"],
            "command": out["command"], "raw": row}


# ---------------------------------------------------------------------------------------------
# llama-server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LlamaServer:
    """A `llama-server` process on 127.0.0.1 serving one GGUF; use as a context manager.

    parallel: slots (``-np``), the most requests decoded together by continuous batching.
    ctx: total KV context (``-c``). With ``kv_unified`` (one KV buffer shared by all slots, the
        server's own default when -np is not given) any slot may use up to `ctx`; without it each
        slot gets ctx / parallel.
    cache_ram: host-memory prompt cache in MiB (``--cache-ram``; 0 disables, -1 unlimited). Idle
        slots are saved there and restored when a later request shares their prefix.
    """

    gguf: Path
    parallel: int = 1
    ctx: int = 4096
    threads: int = DEFAULT_THREADS
    cont_batching: bool = True
    kv_unified: bool = True
    cache_ram: int | None = 0
    extra: list[str] = field(default_factory=list)
    log_path: Path | None = None
    port: int = 0
    proc: subprocess.Popen | None = None
    command: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def build_command(self) -> list[str]:
        cmd = [str(binary("llama-server")), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel), "-c", str(self.ctx),
               "--cont-batching" if self.cont_batching else "--no-cont-batching",
               "--kv-unified" if self.kv_unified else "--no-kv-unified", "--no-webui", "--metrics"]
        if self.cache_ram is not None:
            cmd += ["--cache-ram", str(self.cache_ram)]
        return cmd + list(self.extra)

    def start(self, timeout: float = 120.0) -> "LlamaServer":
        self.port = self.port or free_port()
        cmd = self.build_command()
        self.command = shlex.join(cmd)
        logger.info("$ %s", self.command)
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = wait_healthy(self.proc, self.url, timeout)
        except TimeoutError:
            self.stop()
            raise PeerMissingError(f"llama-server not healthy after {timeout:.0f}s: {self.command}") from None
        if code is not None:
            where = f"; log: {self.log_path}" if self.log_path else ""
            raise PeerMissingError(f"llama-server exited with {code} at start{where}: {self.command}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics`` (enabled with --metrics)."""
        return httpx.get(self.url + "/metrics", timeout=5.0).text

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def versions() -> dict:
    """Versions and build facts of the llama.cpp peer, for the results file."""
    stamp = load_stamp()
    proc = subprocess.run([str(binary("llama-server")), "--version"], capture_output=True, text=True, timeout=30)
    reported = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "llama_cpp_python": stamp["llama_cpp_python"],
        "llama_cpp_commit": stamp["llama_cpp_commit"],
        "llama_server_version": [line for line in reported if "version" in line or "built with" in line],
        "build_commands": stamp["build_commands"],
        "bindings": stamp.get("bindings"),
    }
