"""Start-up: cold start to the first token, server ready, restart to the first resumed session token, and
peak RSS, beside llama.cpp loading the same GGUF in the same run.

Every part starts a fresh process with the commands' defaults (`kvstrata generate`, `kvstrata serve`
with `make serve`'s tier flags) and alternates kvstrata and llama.cpp runs, --reps times: this 2-core
machine is shared, so the figure is the ratio of the medians taken side by side, not either time alone.
kvstrata's caches (converted tokenizer, int8 layout, native kernel) are warm after one untimed run,
whose time is reported as the first run on a machine. Times are from process start: kvstrata's first
token from its own `--log-level debug` line (the process start as /proc records it), everything else
from just before the process is spawned. Peak RSS is each process's own (its VmHWM, polled).

  first token   kvstrata generate PROMPT --max-tokens 16; llama.cpp: llama-server started, then one
                1-token completion as soon as /health answers (llama-cli, the direct analogue, is not
                among the binaries `make bench-peers` builds)
  server ready  kvstrata serve / llama-server: process start to /health answering 200
  restart       a session with a ~2,000-token history, parked at the disk tier, then SIGKILL; from the
                new process's start to the next turn's first token (max_tokens 1). llama.cpp keeps no KV
                across a restart: its new process recomputes the same history.

Run: python -m benchmarks.startup [--reps N]   (results in benchmarks/results/startup.md)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import machine, table, wait_peak_rss_mib, write_results

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
TOOLS_DOC = (ROOT / "docs" / "architecture.md").read_text()  # a long, tool-documentation-like history


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(*args: str) -> list[str]:
    """The `kvstrata` console script users run (python -m kvstrata.cli.main where it is not installed)."""
    exe = Path(sys.executable).with_name("kvstrata")
    return ([str(exe)] if exe.is_file() else [sys.executable, "-m", "kvstrata.cli.main"]) + list(args)


def wait_health(url: str, proc: subprocess.Popen, t0: float, timeout: float = 300) -> float:
    """Seconds from t0 until GET /health answers 200 (polled every 10 ms)."""
    with httpx.Client(timeout=2) as c:
        while time.perf_counter() - t0 < timeout:
            try:
                if c.get(url + "/health").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                log = next((a for a in proc.args if str(a).endswith(".log")), "")
                raise RuntimeError(f"{proc.args[:3]} exited before answering /health {log}")
            time.sleep(0.01)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> float:
    """Signals the process and returns its peak RSS (MiB) once it has exited."""
    try:
        os.kill(proc.pid, sig)  # (not proc.send_signal: it polls first, which would reap the child and its rusage)
    except ProcessLookupError:
        pass
    try:
        return wait_peak_rss_mib(proc, timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return wait_peak_rss_mib(proc)


# -- kvstrata -------------------------------------------------------------------------------------
def kv_first_token(env: dict, log: Path) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as err_f:
        proc = subprocess.Popen(_cmd("--log-level", "debug", "generate", PROMPT, "--max-tokens", "16"), env=env,
                                stdout=subprocess.PIPE, stderr=err_f, text=True)
        out = proc.stdout.read()
        rss = wait_peak_rss_mib(proc)
    wall = time.perf_counter() - t0
    err = log.read_text()
    m = re.search(r"first token ([\d.]+) s after process start", err)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"kvstrata generate failed ({proc.returncode}):\n{err[-3000:]}")
    phases = re.search(r"start phases \(s\): (.*)", err)
    return {"first_token_s": float(m.group(1)), "exit_s": wall, "peak_rss_mib": rss, "text": out.strip(),
            "phases": phases.group(1) if phases else ""}


def kv_serve(env: dict, home: Path, port: int) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    args = ["serve", "--port", str(port), "--kv-host-bytes", "1G", "--kv-disk-dir", str(home / "kv"),
            "--kv-disk-bytes", "10G", "--session-store", str(home / "sessions.db")]
    return subprocess.Popen(_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=open(home / "serve.log", "ab"))


def kv_server_ready(env: dict, home: Path) -> dict:
    port = free_port()
    t0 = time.perf_counter()
    proc = kv_serve(env, home, port)
    try:
        ready = wait_health(f"http://127.0.0.1:{port}", proc, t0)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"model": "default", "max_tokens": 16, "messages": [{"role": "user", "content": PROMPT}]})
        r.raise_for_status()
    finally:
        rss = stop(proc)
    return {"ready_s": ready, "peak_rss_mib": rss}


def history(n_chars: int = 8000) -> list[dict]:
    return [{"role": "system", "content": "You are an agent. Reference:\n" + TOOLS_DOC[:n_chars]},
            {"role": "user", "content": "Which module verifies blocks loaded from a tier?"}]


def kv_restart(env: dict, home: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = kv_serve(env, home, port)
    try:
        wait_health(url, proc, time.perf_counter())
        msgs = history()
        sid = httpx.post(url + "/v1/sessions", json={"system": msgs[0]["content"]}, timeout=30).json()["id"]
        first = httpx.post(f"{url}/v1/sessions/{sid}/generate", timeout=300,
                           json={"messages": msgs[1:], "max_tokens": 8}).json()
        httpx.post(f"{url}/v1/sessions/{sid}/park", json={"tier": "disk"}, timeout=120).raise_for_status()
    finally:
        stop(proc, signal.SIGKILL)
    t0 = time.perf_counter()
    proc = kv_serve(env, home, port)
    try:
        wait_health(url, proc, t0)
        r = httpx.post(f"{url}/v1/sessions/{sid}/generate", timeout=300,
                       json={"messages": [{"role": "user", "content": "And which one parks sessions?"}], "max_tokens": 1})
        r.raise_for_status()
        resumed = time.perf_counter() - t0
        usage = r.json()["usage"]
    finally:
        stop(proc)
    return {"resumed_token_s": resumed, "history_tokens": first["usage"]["prompt_tokens"],
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens")}


# -- llama.cpp ------------------------------------------------------------------------------------
def llama_server(binary: Path, gguf: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2", "--no-webui"]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def llama_first_token(binary: Path, gguf: Path, log: Path) -> dict:
    port = free_port()
    t0 = time.perf_counter()
    proc = llama_server(binary, gguf, port, log)
    try:
        ready = wait_health(f"http://127.0.0.1:{port}", proc, t0)
        r = httpx.post(f"http://127.0.0.1:{port}/completion", json={"prompt": PROMPT, "n_predict": 1}, timeout=120)
        r.raise_for_status()
        first = time.perf_counter() - t0
    finally:
        rss = stop(proc)
    return {"first_token_s": first, "ready_s": ready, "peak_rss_mib": rss}


def llama_restart(binary: Path, gguf: Path, log: Path) -> dict:
    port = free_port()
    t0 = time.perf_counter()
    proc = llama_server(binary, gguf, port, log)
    try:
        wait_health(f"http://127.0.0.1:{port}", proc, t0)
        msgs = history() + [{"role": "assistant", "content": "kv/offload.py and tiers/stack.py."},
                            {"role": "user", "content": "And which one parks sessions?"}]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300,
                       json={"messages": msgs, "max_tokens": 1})
        r.raise_for_status()
        resumed = time.perf_counter() - t0
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
    finally:
        stop(proc)
    return {"resumed_token_s": resumed, "prompt_tokens": prompt_tokens}


def llama_binary() -> tuple[Path | None, str]:
    try:
        from benchmarks.peers.common import binary

        return binary("llama-server"), ""
    except Exception as e:  # PeerMissingError, or the peers package unimportable
        return None, str(e)


# -- report ---------------------------------------------------------------------------------------
def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def spread(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return f"{min(vals):.2f}-{max(vals):.2f}" if vals else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    from benchmarks.peers.common import cpu_pressure, default_gguf

    gguf = default_gguf()
    llama, why = llama_binary()
    home = Path(tempfile.mkdtemp(prefix="kvstrata-startup-"))
    env = {**os.environ, "KVSTRATA_HOME": str(home / "cache"), "PYTHONPATH": f"{ROOT / 'src'}"}
    # kvstrata's modules byte-compiled first, as pip leaves an installed package (and `make install`
    # this checkout): where PYTHONDONTWRITEBYTECODE is set, as on the machines these figures come from,
    # no run would write them, and every start would compile ~44 modules (generate, ~0.1 s) or ~96
    # (serve, ~0.22 s) from source
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src" / "kvstrata")], check=True,
                   stdout=subprocess.DEVNULL)
    print("first run (empty caches)", flush=True)
    first_ever = kv_first_token(env, home / "generate.log")  # converts the tokenizer, writes the layout, builds the kernel
    kv = {"first": [], "ready": [], "restart": []}
    peer = {"first": [], "restart": []}
    pressure = [cpu_pressure()]
    log = home / "llama-server.log"
    for rep in range(a.reps):
        print(f"repetition {rep + 1}/{a.reps}", flush=True)
        kv["first"].append(kv_first_token(env, home / "generate.log"))
        if llama:
            peer["first"].append(llama_first_token(llama, gguf, log))
        kv["ready"].append(kv_server_ready(env, home / f"serve{rep}"))
        kv["restart"].append(kv_restart(env, home / f"restart{rep}"))
        if llama:
            peer["restart"].append(llama_restart(llama, gguf, log))
        pressure.append(cpu_pressure())
    shutil.rmtree(home, ignore_errors=True)

    def ratio(x, y):
        return f"{x / y:.2f}x" if x is not None and y else "-"

    k1, p1 = med(kv["first"], "first_token_s"), med(peer["first"], "first_token_s")
    kr, pr = med(kv["ready"], "ready_s"), med(peer["first"], "ready_s")
    k3, p3 = med(kv["restart"], "resumed_token_s"), med(peer["restart"], "resumed_token_s")
    rows = [
        ["first token (s)", f"{k1:.2f} ({spread(kv['first'], 'first_token_s')})",
         f"{p1:.2f} ({spread(peer['first'], 'first_token_s')})" if p1 else "-", ratio(k1, p1), "<= 1 s"],
        ["server ready, /health (s)", f"{kr:.2f} ({spread(kv['ready'], 'ready_s')})",
         f"{pr:.2f} ({spread(peer['first'], 'ready_s')})" if pr else "-", ratio(kr, pr), "<= 2 s"],
        ["restart to resumed token (s)", f"{k3:.2f} ({spread(kv['restart'], 'resumed_token_s')})",
         f"{p3:.2f} ({spread(peer['restart'], 'resumed_token_s')})" if p3 else "-", ratio(k3, p3), "<= 3 s"],
        ["peak RSS, generate / first token (MiB)", f"{med(kv['first'], 'peak_rss_mib'):.0f}",
         f"{med(peer['first'], 'peak_rss_mib'):.0f}" if p1 else "-", "", "<= 1024"],
        ["peak RSS, serve with one request (MiB)", f"{med(kv['ready'], 'peak_rss_mib'):.0f}", "-", "", "<= 1024"],
    ]
    note = "" if llama else f"\n\nllama.cpp column skipped: {why}\n"
    md = (f"# Start-up\n\n{machine()}; {a.reps} alternating repetitions, median (range); default model "
          f"({gguf.name}); CPU pressure before / after each repetition: {pressure}.{note}\n\n"
          + table(["", "kvstrata", "llama.cpp", "kvstrata / llama.cpp", "goal"], rows)
          + f"\n\nFirst run on a machine (empty caches: tokenizer conversion, int8 layout, native kernel "
            f"build): first token {first_ever['first_token_s']:.2f} s, "
            f"peak RSS {first_ever['peak_rss_mib']:.0f} MiB.\n\n"
          + f"Restart: history {med(kv['restart'], 'history_tokens'):.0f} tokens; the resumed turn's prompt "
            f"{med(kv['restart'], 'prompt_tokens'):.0f} tokens of which {med(kv['restart'], 'cached_tokens')} "
            f"came from the tiers (median).\n\nkvstrata start phases (last run): {kv['first'][-1]['phases']}\n")
    path = write_results("startup", md, {"kvstrata": kv, "llama.cpp": peer, "first_run": first_ever,
                                         "pressure": pressure, "machine": machine(), "peer_missing": why})
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
