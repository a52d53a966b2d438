"""kvstrata's side of the peer workloads: the same prompts and settings as llama.cpp gets.

Single stream runs in-process through `kvstrata.LLM` (the engine's own step loop, timed from its
request metrics); concurrency and the tau-bench replay drive a `kvstrata serve` subprocess over the
same OpenAI-compatible HTTP as llama-server, with `http_load` / `tau_replay`.

The engine settings come from one place, `KVSTRATA_ENGINE` (EngineConfig field names; `run_peers
--kvstrata-quant / --kvstrata-opt` override them). Each part adds only what the workload fixes: the
device KV pool holds exactly the tokens llama.cpp's ``-c`` gives it, `max_num_seqs` equals its slots
(``-np``), and the tau part adds the host-memory tier (≈ ``--cache-ram``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.peers.common import default_gguf, interleaved, wait_healthy
from benchmarks.peers.http_load import load
from benchmarks.peers.llamacpp import DEFAULT_THREADS, free_port
from benchmarks.peers.tau_replay import load_sessions, replay
from kvstrata.core import KvstrataError

logger = logging.getLogger(__name__)

# The engine settings every kvstrata part uses (EngineConfig field names). Threads as the peers'.
# int8 weights with the native decode step; fp16 KV, as llama.cpp keeps its KV by default (-ctk/-ctv f16);
# no speculative decoding, as llama.cpp by default (on random-token prompts the greedy output repeats and
# prompt lookup would more than double the decode figure: a comparison of drafts, not of steps)
KVSTRATA_ENGINE: dict = {"quantization": "int8", "kv_dtype": "float16", "num_threads": DEFAULT_THREADS,
                         "speculative": "off"}


class EngineServerError(KvstrataError):
    """`kvstrata serve` did not start, died, or did not become healthy in time."""


def engine_settings(overrides: dict | None = None, base: dict | None = None) -> dict:
    """`base` (default KVSTRATA_ENGINE) updated with `overrides`; validated by EngineConfig, so an unknown
    key or bad value fails here, before any part runs."""
    from kvstrata.config import EngineConfig

    s = {**(KVSTRATA_ENGINE if base is None else base), **(overrides or {})}
    EngineConfig.from_dict(s, "kvstrata engine settings")
    return s


def full_config(settings: dict) -> dict:
    """Every EngineConfig field (defaults included) for `settings`: what the results record."""
    from kvstrata.config import EngineConfig

    return dataclasses.asdict(EngineConfig.from_dict(settings))


def engine_flags(settings: dict) -> list[str]:
    """`kvstrata serve` flags for `settings`: ``{"max_num_seqs": 8, "enable_prefix_caching": False}`` ->
    ``["--max-num-seqs", "8", "--no-enable-prefix-caching"]``. None values are left out."""
    flags: list[str] = []
    for k, v in settings.items():
        name = "--" + k.replace("_", "-")
        if v is None:
            continue
        if isinstance(v, bool):
            flags.append(name if v else "--no-" + k.replace("_", "-"))
        else:
            flags += [name, str(v)]
    return flags


def parse_opt(text: str) -> tuple[str, object]:
    """``"max_num_batched_tokens=4096"`` -> ("max_num_batched_tokens", 4096); JSON values, else strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--kvstrata-opt wants KEY=VALUE (an EngineConfig field), got {text!r}")
    try:
        val = json.loads(raw)
    except json.JSONDecodeError:
        val = raw
    return key.strip().replace("-", "_"), val


@functools.lru_cache(maxsize=4)
def _spec(gguf: Path):
    from kvstrata.planner.modelspec import ModelSpec

    return ModelSpec.from_gguf(gguf)  # reads the GGUF's metadata: seconds on 2 busy cores, so once


def kv_pool_bytes(tokens: int, settings: dict, gguf: Path | None = None) -> int:
    """Bytes of a device KV pool of exactly ceil(tokens / block_size) blocks of the default model."""
    import torch

    from kvstrata.kv.pool import BlockPool

    spec = _spec(gguf or default_gguf())
    bs = settings.get("block_size", 16)
    kv = settings.get("kv_dtype", "auto")
    kv = settings.get("dtype", "auto") if kv == "auto" else kv
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(kv, torch.float32)
    per = BlockPool.bytes_per_block(bs, spec.n_layers, spec.n_kv_heads, spec.head_dim, dt)
    return math.ceil(tokens / bs) * per


def versions() -> dict:
    """kvstrata's version and the repository commit (with a dirty flag) the run measured."""
    import torch

    import kvstrata

    root = Path(__file__).resolve().parents[2]
    out = {"kvstrata": kvstrata.__version__, "torch": torch.__version__}
    try:
        out["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["src_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ---------------------------------------------------------------------------------------------
# single stream, in-process


def _best(samples: list[float]) -> float:
    return round(max(samples), 2)


def single_stream(w: dict, settings: dict, *, seed: int = 0) -> dict:
    """Prefill tokens/s (time to first token of an N-token random prompt, prefix cache reset) and decode
    tokens/s (`decode_n_gen` tokens after `depth` tokens of context prefilled untimed), as llama-bench's
    ``pp N`` and ``tg128 @ d D``. Best of 2 (1 at >= 8,192 tokens) and of 3."""
    import gc

    import torch

    from kvstrata import LLM, SamplingParams

    n_gen = w["decode_n_gen"]
    biggest = max(max(w["prefill_tokens"]), max(w["decode_depths"]) + n_gen + 1)
    s = {**settings, "max_model_len": max(w["prefill_tokens"]) + 1,
         "kv_device_bytes": kv_pool_bytes(biggest + 2 * settings.get("block_size", 16), settings)}
    t0 = time.perf_counter()
    llm = LLM(**{"model": "default", **s})
    load_s = time.perf_counter() - t0
    eng = llm.engine
    gen = torch.Generator().manual_seed(seed)
    vocab = eng.model_config.vocab_size

    def ids(n: int) -> list[int]:  # random ids, avoiding the first 100 (special tokens), as llama-bench / transformers
        return torch.randint(100, vocab, (n,), generator=gen).tolist()

    llm.generate([ids(32)], SamplingParams(max_tokens=4, ignore_eos=True))  # warmup
    out: dict = {"engine_config": full_config(s), "load_s": round(load_s, 1),
                 "max_model_len": eng.max_model_len, "prefill": [], "decode": []}
    for n in w["prefill_tokens"]:
        m = min(n, eng.max_model_len - 1)  # the engine wants room for one generated token
        samples = []
        for _ in range(1 if n >= 8192 else 2):
            eng.pool.reset_prefix_cache()
            o = llm.generate([ids(m)], SamplingParams(max_tokens=1))[0]
            samples.append(m / o.metrics.ttft_s)
        out["prefill"].append({"tokens": n, "tokens_measured": m, "tps": _best(samples),
                               "samples_ts": [round(x, 2) for x in samples]})
        logger.info("kvstrata prefill %d: %.1f tok/s", n, max(samples))
    for d in w["decode_depths"]:
        ctx = ids(d)
        samples, ceilings = interleaved(lambda: _decode_once(eng, ctx, n_gen), 3)
        out["decode"].append({"depth": d, "n_gen": n_gen, "tps": _best(samples), "samples_ts": [round(x, 2) for x in samples],
                              "bytes_per_token": decode_bytes_per_token(eng, d), "ceilings_GBps": ceilings})
        logger.info("kvstrata decode @%d: %.1f tok/s", d, max(samples))
    out["method"] = (f"in-process kvstrata.LLM(model='default', **{s}); prefill = N / TTFT of generate(max_tokens=1) "
                     f"after pool.reset_prefix_cache(), best of 2 (1 at 8,192); decode = {n_gen} tokens timed after the "
                     f"D-token context is prefilled untimed (its first token included in the prefill), ignore_eos, greedy, "
                     f"best of 3, with a memory-bandwidth sample before, between and after the repetitions")
    eng.close(flush_device=False)
    llm = eng = None  # freed before the server side starts
    gc.collect()
    return out


def decode_bytes_per_token(eng, depth: int) -> int:
    """What one decoded token reads from memory: every weight matrix once, as the engine stores it (int8
    with fp32 per-channel scales, or fp32), the LM head (tied: the embedding table), the norms, and K and V
    of `depth` context tokens in the pool's dtype."""
    from torch import nn

    from kvstrata.model.quant import PerTokenInt8Linear

    m, total = eng.model, 0
    for mod in m.modules():
        if isinstance(mod, PerTokenInt8Linear):
            w8, _ = mod.int8_weight()
            total += w8.numel() * w8.element_size() + 4 * w8.shape[0]
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    if m.lm_head_q is None and m.lm_head is None:  # tied fp32 head: the whole embedding table
        total += m.embed_tokens.weight.numel() * m.embed_tokens.weight.element_size()
    total += sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n.endswith("layernorm.weight"))
    pool = eng.pool
    per_token_one_side = pool.k[:, 0, 0].numel()  # layers x kv heads x head_dim
    total += depth * 2 * per_token_one_side * pool.k.element_size()
    return int(total)


def _decode_once(eng, ctx: list[int], n_gen: int) -> float:
    """Prefill `ctx` (untimed; its step also samples the first token), then time `n_gen` decode steps."""
    from kvstrata import SamplingParams

    rid = eng.add_request(ctx, SamplingParams(max_tokens=n_gen + 1, ignore_eos=True))
    seqs = eng.requests[rid].seqs
    while any(q.in_prefill for q in seqs):
        eng.step()
    start = eng.counters["generated_tokens"]
    t0 = time.perf_counter()
    eng.run_to_completion()
    dt = time.perf_counter() - t0
    done = eng.counters["generated_tokens"] - start
    assert done == n_gen, f"expected {n_gen} timed tokens, the engine generated {done}"
    return done / dt


# ---------------------------------------------------------------------------------------------
# the HTTP server


def kvstrata_command() -> list[str]:
    """The `kvstrata` console script next to this Python, else ``python -m kvstrata.cli.main``."""
    exe = Path(sys.executable).parent / "kvstrata"
    return [str(exe)] if exe.is_file() and os.access(exe, os.X_OK) else [sys.executable, "-m", "kvstrata.cli.main"]


@dataclass
class KvstrataServer:
    """`kvstrata serve --model default` on 127.0.0.1 with `settings` as engine flags; a context manager.

    Each start gets a fresh temporary KVSTRATA_HOME (with the SQLite session store in it), removed on
    stop, so no run sees another's sessions or tiers. Output goes to `log_path`; a server that exits or
    is not healthy within `timeout` raises EngineServerError with the log's tail."""

    settings: dict
    log_path: Path | None = None
    port: int = 0
    timeout: float = 300.0
    shutdown_timeout: float = 10.0
    proc: subprocess.Popen | None = None
    command: str = ""
    home: Path | None = None
    returncode: int | None = None
    graceful: bool | None = None  # the log says uvicorn's shutdown completed
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def build_command(self) -> list[str]:
        assert self.home is not None
        return [*kvstrata_command(), "--log-level", "INFO", "serve", "--model", "default", "--host", "127.0.0.1",
                "--port", str(self.port), "--session-store", str(self.home / "sessions.db"),
                "--shutdown-timeout", str(self.shutdown_timeout), *engine_flags(self.settings), *self.extra]

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> "KvstrataServer":
        self.port = self.port or free_port()
        self.home = Path(tempfile.mkdtemp(prefix="kvstrata-bench-home-"))
        cmd = self.build_command()
        self.command = shlex.join(cmd)
        logger.info("$ %s", self.command)
        env = {**os.environ, "KVSTRATA_HOME": str(self.home), "TOKENIZERS_PARALLELISM": "false"}
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child has its own descriptor
        try:
            code = wait_healthy(self.proc, self.url, self.timeout)
        except TimeoutError:
            tail = self.log_tail()
            self.stop()
            raise EngineServerError(f"kvstrata serve not healthy after {self.timeout:.0f}s: {self.command}\n"
                                    f"log {self.log_path}:\n{tail}") from None
        if code is not None:
            self.stop()
            raise EngineServerError(f"kvstrata serve exited with {code} at start: {self.command}\n"
                                    f"log {self.log_path}:\n{self.log_tail()}")
        return self

    def stop(self) -> None:
        """SIGTERM (graceful: in-flight requests get --shutdown-timeout), then SIGKILL if it hangs."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=self.shutdown_timeout + 30)
                except subprocess.TimeoutExpired:
                    logger.warning("kvstrata serve did not stop on SIGTERM; killing pid %d", self.proc.pid)
                    self.proc.kill()
                    self.proc.wait()
            self.returncode = self.proc.returncode  # -15 after a graceful stop: uvicorn re-raises SIGTERM
            self.proc = None
            self.graceful = "Application shutdown complete" in (self.log_tail(15) if self.log_path else "")
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None

    def metrics(self) -> dict:
        """The engine counters (steps, preemptions, tokens), HTTP requests by status and KV tier stats."""
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10.0).text)

    def __enter__(self) -> "KvstrataServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_KEEP = ("kvstrata_engine_counter{", "kvstrata_http_requests_total{", "kvstrata_kv_tier{", "kvstrata_kv_blocks{")


def parse_metrics(text: str, keep: tuple[str, ...] = _KEEP) -> dict:
    """Prometheus text -> {'name{labels}': value} for the series whose names start with `keep`."""
    out = {}
    for line in text.splitlines():
        if line.startswith(keep):
            key, _, val = line.rpartition(" ")
            try:
                out[key] = float(val)
            except ValueError:
                pass
    return out


def _metrics_or_error(srv: KvstrataServer) -> dict:
    try:
        return srv.metrics()
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------------------------
# HTTP workloads


def concurrency(w: dict, settings: dict, logs: Path) -> list[dict]:
    """Per level N: a fresh server with N sequences and a device pool of N × slot_ctx tokens (llama-server's
    -np N -c N*slot_ctx), the same warmup and load as llama-server gets."""
    out = []
    for c in w["concurrency"]:
        s = {**settings, "max_num_seqs": c, "kv_device_bytes": kv_pool_bytes(c * w["slot_ctx"], settings)}
        srv = KvstrataServer(s, log_path=logs / f"kvstrata-serve-c{c}.log")
        with srv:
            load(srv.url, concurrency=2, num_requests=2, max_tokens=8, prompt_words=20, seed=99)  # warmup
            res = load(srv.url, concurrency=c, num_requests=w["requests"][c], max_tokens=w["max_tokens"],
                       prompt_words=w["prompt_words"], max_seconds=w["load_max_seconds"])
            m = _metrics_or_error(srv)
        out.append(res.to_dict() | {"server_command": srv.command, "engine_config": full_config(s),
                                    "server_metrics": m, "server_exit": srv.returncode,
                                    "server_graceful_stop": srv.graceful, "server_log": str(srv.log_path)})
    return out


def tau(w: dict, settings: dict, logs: Path) -> dict:
    """The tau-bench replay against one server: prefix caching on, a device pool of concurrency × slot_ctx
    tokens (llama-server's -c), the host tier at cache_ram_mib MiB (its --cache-ram)."""
    t = w["tau"]
    sessions = load_sessions(n_sessions=t["n_sessions"], max_tokens_cap=t["max_tokens_cap"], max_chars=t["max_chars"])
    s = {**settings, "max_num_seqs": t["concurrency"], "enable_prefix_caching": True,
         "kv_device_bytes": kv_pool_bytes(t["concurrency"] * t["slot_ctx"], settings),
         "kv_host_bytes": t["cache_ram_mib"] << 20}
    srv = KvstrataServer(s, log_path=logs / "kvstrata-serve-tau.log")
    with srv:
        res = replay(srv.url, sessions, concurrency=t["concurrency"], tool_wait_s=t["tool_wait_s"])
        m = _metrics_or_error(srv)
    return res | {"server_command": srv.command, "task_ids": [x.task_id for x in sessions],
                  "engine_config": full_config(s), "server_metrics": m, "server_exit": srv.returncode,
                  "server_graceful_stop": srv.graceful, "server_log": str(srv.log_path)}
