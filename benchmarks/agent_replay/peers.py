"""The servers one replay compares, under one memory budget, launched with benchmarks/peers' helpers.

* ``llama-server``: llama.cpp (`benchmarks.peers.llamacpp.LlamaServer`) on the same GGUF, in the
  configuration its own flags offer for many agent sessions on one KV budget (`llama-server --help`, the
  server source at the pinned commit): one unified KV buffer of the device budget shared by every slot
  (``--kv-unified -c``); ``-np`` = budget / context slots, because a unified buffer that the running slots
  outgrow fails *every* running request ("Context size has been exceeded", server-context.cpp) rather than
  waiting, so more slots than fit is not a safe configuration; continuous batching (``-cb``, its default);
  its prompt cache in host RAM (``--cache-ram``, the same bytes as kvstrata's host tier) with
  ``--cache-idle-slots`` (its default with --cache-ram: an idle slot is saved there and cleared when a new
  task starts, and a request whose prompt shares a cached prefix loads it back); ``--cache-reuse`` of
  chunks via KV shifting (16 tokens here: 256 at full scale, the chunk size of llama.cpp's own example in
  ggml-org/llama.cpp PR 17858, times 1/16; the replay's prompts only grow, so prefix reuse does most).
  It has no disk tier.
* ``kvstrata-tiers``: `kvstrata serve` with the same device budget, the host tier at the same bytes, a disk
  tier (under a temporary directory), prefix caching, write-on-evict: the hierarchy; evicted blocks go down
  and a later prompt finds them there. `max_num_seqs` = the replay's concurrency, since kvstrata preempts
  (and moves KV down) when the running sequences outgrow the pool instead of failing them.
* ``kvstrata-recompute``: the same engine and budget, tiers off and prefix caching off: every turn
  recomputes its whole prompt (recompute on resume, the baseline the tiers are measured against).
* ``kvstrata-device`` (optional): prefix caching in the device pool only, no tiers.

Every kvstrata peer runs `benchmarks.peers.kvstrata_side.KVSTRATA_ENGINE` (int8 weights with the native
decode step, as ``--quantization auto`` picks on this CPU; fp16 KV, as llama.cpp's default; 2 threads, as
llama-server's ``-t 2``), so every ratio is against a peer on the same quantization and threads.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.peers.common import default_gguf
from benchmarks.peers.kvstrata_side import KvstrataServer, engine_settings, full_config, kv_pool_bytes, parse_metrics
from benchmarks.peers.llamacpp import DEFAULT_THREADS, LlamaServer

logger = logging.getLogger(__name__)

PEERS = ("llama-server", "kvstrata-tiers", "kvstrata-recompute", "kvstrata-device")
DEFAULT_PEERS = PEERS[:3]


@dataclass(frozen=True)
class Budget:
    device_tokens: int = 32768  # device KV pool of every peer, in tokens of the default model (fp16 KV)
    host_mib: int = 1024  # kvstrata's host tier = llama-server's --cache-ram
    disk_gib: int = 8  # kvstrata's disk tier (llama-server has none)
    context: int = 8192  # the model's context: the longest prompt + output one request may need
    kvstrata_max_seqs: int = 16
    llama_slots: int | None = None  # default device_tokens // context (at least 1)
    cache_reuse: int = 16
    threads: int = DEFAULT_THREADS

    @property
    def slots(self) -> int:
        return self.llama_slots or max(1, self.device_tokens // self.context)


def kvstrata_settings(peer: str, b: Budget, disk_dir: Path | None, overrides: dict | None = None) -> dict:
    s = engine_settings({"num_threads": b.threads, **(overrides or {})})
    s.update(max_num_seqs=b.kvstrata_max_seqs, kv_device_bytes=kv_pool_bytes(b.device_tokens, s),
             max_model_len=b.context)
    if peer == "kvstrata-tiers":
        s.update(enable_prefix_caching=True, kv_host_bytes=b.host_mib << 20, kv_disk_dir=str(disk_dir),
                 kv_disk_bytes=b.disk_gib << 30)
    elif peer == "kvstrata-recompute":
        s.update(enable_prefix_caching=False)
    elif peer == "kvstrata-device":
        s.update(enable_prefix_caching=True)
    else:
        raise ValueError(f"unknown kvstrata peer {peer!r}; one of {PEERS}")
    return s


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set (VmHWM), read while it runs."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_KEEP = ("kvstrata_engine_counter{", "kvstrata_kv_tier{", "kvstrata_kv_blocks{", "kvstrata_placement_decisions{",
         "kvstrata_session_kv{", "kvstrata_http_requests_total{", "llamacpp:")


def server_metrics(url: str) -> dict:
    """The Prometheus series the results keep (engine counters, tiers, placement, program pauses; llama.cpp's
    own)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10.0).text
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return parse_metrics(text, _KEEP)


@dataclass
class Running:
    """A started peer: where to send requests and how to read its process."""

    peer: str
    url: str
    pid: int
    command: str
    config: dict


@contextlib.contextmanager
def serve(peer: str, b: Budget, logs: Path, kvstrata_overrides: dict | None = None):
    """Start `peer` for one replay and stop it afterwards; yields a `Running`."""
    logs.mkdir(parents=True, exist_ok=True)
    if peer == "llama-server":
        srv = LlamaServer(default_gguf(), parallel=b.slots, ctx=b.device_tokens, threads=b.threads,
                          cont_batching=True, kv_unified=True, cache_ram=b.host_mib,
                          extra=["--cache-reuse", str(b.cache_reuse), "--cache-idle-slots"],
                          log_path=logs / "llama-server-agent-replay.log")
        with srv:
            yield Running(peer, srv.url, srv.proc.pid, srv.command,
                          {"slots": b.slots, "ctx": b.device_tokens, "cache_ram_mib": b.host_mib,
                           "cache_reuse": b.cache_reuse, "kv_unified": True, "threads": b.threads})
        return
    disk = Path(tempfile.mkdtemp(prefix="kvstrata-replay-disk-")) if peer == "kvstrata-tiers" else None
    try:
        s = kvstrata_settings(peer, b, disk, kvstrata_overrides)
        srv = KvstrataServer(s, log_path=logs / f"kvstrata-serve-{peer}.log")
        with srv:
            yield Running(peer, srv.url, srv.proc.pid, srv.command, full_config(s))
    finally:
        if disk is not None:
            shutil.rmtree(disk, ignore_errors=True)
