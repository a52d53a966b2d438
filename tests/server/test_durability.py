"""Durable by default: with exactly the flags `make serve` passes, a session turn, SIGKILL, restart, next
turn finds the history's KV on disk (>= 90% of the prompt cached) and answers what a server that was never
killed answers."""

from __future__ import annotations

import os
import re
import shlex
import signal
from pathlib import Path

import httpx
import pytest

from tests.server.harness import REPO, ServerProcess

pytestmark = pytest.mark.slow

# ~900 tokens of varied text (the prefix a coding agent's turn carries: instructions, then context)
CONTEXT = " ".join(
    f"Step {i}: open the file src/module_{i % 7}.py, read the function handle_{i}, check its {w} branch and "
    f"note what it returns when the input is {i * 3 % 11}."
    for i, w in zip(range(28), ["error", "empty", "retry", "timeout"] * 7))


def make_serve_flags(home: Path) -> list[str]:
    """The `kvstrata serve` arguments of the Makefile's `serve` target (host and port left out: the
    harness picks them), with its KVSTRATA_HOME set to `home`."""
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^serve:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    cmd = " ".join(line.strip().rstrip("\\") for line in recipe.splitlines())
    cmd = cmd.replace("$(KVHOME)", str(home)).replace("$${PORT:-8000}", "0")
    args = shlex.split(cmd.split(" serve ", 1)[1])
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--host", "--port"):
            skip = True
        else:
            out.append(a)
    assert "--model" in out and "--kv-disk-dir" in out, out  # the recipe still has the shape this reads
    return out


def post(url: str, body: dict) -> dict:
    r = httpx.post(url, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def two_turns(srv: ServerProcess, kill_between: bool, tmp: Path, started: list) -> tuple[dict, dict]:
    """Two turns of one session; with kill_between, SIGKILL and a restart between them (the restarted
    server is appended to `started`, which the caller closes)."""
    sid = post(srv.url + "/v1/sessions", {"system": "You are a careful coding agent. Answer in one line."})["id"]
    first = post(srv.url + f"/v1/sessions/{sid}/generate", {
        "messages": [{"role": "user", "content": CONTEXT + "\nWhich step touches module 3 first?"}],
        "max_tokens": 24, "temperature": 0})
    if kill_between:  # right after the reply: no grace for the writes behind it beyond the reply's own path
        srv.kill(signal.SIGKILL)
        srv.close()
        assert srv.proc.returncode == -signal.SIGKILL
        srv = ServerProcess(srv.args, tmp / "restarted.log", env=srv.env)
        started.append(srv)
        srv.wait_ready(300)
    second = post(srv.url + f"/v1/sessions/{sid}/generate", {
        "messages": [{"role": "user", "content": "And which step checks a timeout branch last?"}],
        "max_tokens": 24, "temperature": 0})
    return first, second


def test_make_serve_flags_survive_sigkill_between_turns(tmp_path):
    runs = {}
    for name, kill in (("reference", False), ("killed", True)):
        home = tmp_path / name
        home.mkdir()
        env = {"KVSTRATA_HOME": str(home)}
        started = [ServerProcess(make_serve_flags(home), tmp_path / f"{name}.log", env=env)]
        try:
            runs[name] = two_turns(started[0].wait_ready(300), kill, tmp_path, started)
        finally:
            for srv in started:  # the restarted server too (it used to outlive the test)
                srv.close()
    (ref1, ref2), (k1, k2) = runs["reference"], runs["killed"]
    assert k1["message"] == ref1["message"]
    usage = k2["usage"]
    cached, prompt = usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]
    assert cached >= 0.9 * prompt, usage  # the history's KV came back from disk, not recomputed
    assert usage["prompt_tokens_details"]["cached_tokens_by_tier"].get("disk", 0) > 0, usage
    assert k2["message"] == ref2["message"]  # restored KV answers what the never-killed server answers
    assert os.path.isdir(tmp_path / "killed" / "kv")
