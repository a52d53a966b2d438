"""What the chaos clients do, and how their results are judged.

Sessions: scripted conversations (greedy, a few turns each), driven through `/v1/sessions` with the
protocol that makes a turn exactly-once: every attempt carries the session version the client last saw
(`expected_version`), and after any attempt whose outcome it did not see (a killed server, its own
cancellation) the client reads the session back to learn whether the turn was committed. Chat: single greedy
completions. Jobs: multi-step tasks (follow-ups) submitted before the faults start. A never-disturbed
reference run of the same scripts (first, on the same server, before any fault, with nothing cached)
gives the expected output of every turn, completion and task.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.chaos.harness import ChaosServer, Tally, call

MAX_TOKENS = 10
SETTLE_S = 0.5  # after a cancelled or lost request, before reading the session back
TOPICS = ("the quick brown fox", "a little engine", "Paris and France", "agents that call tools", "the lazy dog",
          "fibonacci numbers", "a cache that keeps context warm", "Köln and Tokyo")


@dataclass(frozen=True)
class Script:
    system: str
    turns: tuple[str, ...]


def session_scripts(n: int, turns: int = 3) -> list[Script]:
    return [Script(f"You are chaos client {i}. Answer briefly.",
                   tuple(f"Tell me about {TOPICS[(i + k) % len(TOPICS)]}, part {k} of script {i}." for k in range(turns)))
            for i in range(n)]


def chat_prompts(n: int) -> list[str]:
    return [f"Say something about {TOPICS[i % len(TOPICS)]} number {i}." for i in range(n)]


def job_spec(n_tasks: int) -> dict[str, Any]:
    return {"name": "chaos", "max_concurrent_agents": 4, "tasks": [
        {"id": f"task{i}", "system": "You are a chaos job agent.", "user": f"Work on {TOPICS[i % len(TOPICS)]}.",
         "followups": [f"Now summarise step {i}.", "One more word."], "tools": [], "max_tokens": MAX_TOKENS,
         "sampling": {"temperature": 0}} for i in range(n_tasks)]}


@dataclass
class SessionRecord:
    script: int
    session_id: str
    answers: list[str | None] = field(default_factory=list)  # what the client saw committed, per turn


def run_session(server: ChaosServer, tally: Tally, scripts: list[Script], idx: int, rng: random.Random,
                cancel_p: float = 0.0) -> SessionRecord:
    sc = scripts[idx]
    s = _ok(tally, call(server, tally, "POST", "/v1/sessions", json={"system": sc.system})).json()
    rec = SessionRecord(idx, s["id"])
    version = s["version"]
    for k, user in enumerate(sc.turns):
        answer, version = _turn(server, tally, rec.session_id, version, k, user, rng, cancel_p)
        rec.answers.append(answer)
        tally.add("turns")
        if answer is None:
            break
    return rec


def _turn(server: ChaosServer, tally: Tally, sid: str, version: int, k: int, user: str, rng: random.Random,
          cancel_p: float) -> tuple[str | None, int]:
    """Turn k, exactly once: each attempt carries the version the client last saw, so an attempt that
    lands after another one committed gets 409 instead of appending the turn twice."""
    body = {"messages": [{"role": "user", "content": user}], "max_tokens": MAX_TOKENS, "temperature": 0}
    path = f"/v1/sessions/{sid}/generate"
    cancel = rng.random() < cancel_p
    for _ in range(50):
        attempt = {**body, "expected_version": version}
        if cancel:  # a client that gives up at a random point of the request, then looks
            cancel = False
            server.up.wait(240)
            try:
                httpx.post(server.url + path, json=attempt, timeout=rng.uniform(0.005, 0.4))
            except httpx.HTTPError:
                tally.add("cancelled_by_client")
            r = None
        else:
            r = call(server, tally, "POST", path, json=attempt, idempotent=False)
        if r is not None and r.status_code == 200:
            return r.json()["message"]["content"], r.json()["session"]["version"]
        if r is not None and r.status_code != 409:
            tally.add("client_errors", note=f"turn {k} of {sid}: {r.status_code} {r.text[:200]}")
            return None, version
        if r is None:
            time.sleep(SETTLE_S)
        s = _ok(tally, call(server, tally, "GET", f"/v1/sessions/{sid}")).json()
        msgs, version = s["messages"], s["version"]
        if len(msgs) == 2 * k + 2 and msgs[2 * k]["content"] == user:
            return msgs[2 * k + 1]["content"], version  # committed before we lost sight of it
        if len(msgs) != 2 * k:
            return None, version  # neither committed nor absent: the final check counts it
    return None, version


def run_chat(server: ChaosServer, tally: Tally, prompt: str, rng: random.Random, cancel_p: float) -> str | None:
    body = {"model": "chaos", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": rng.random() < 0.5}
    if rng.random() < cancel_p:
        server.up.wait(240)
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                              timeout=rng.uniform(0.005, 0.3)) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            tally.add("cancelled_by_client")
    r = _ok(tally, call(server, tally, "POST", "/v1/chat/completions", json={**body, "stream": False}))
    return r.json()["choices"][0]["message"]["content"]


# -------------------------------------------------------------------------------------- the reference


def reference(server: ChaosServer, tally: Tally, scripts: list[Script], prompts: list[str],
              n_tasks: int) -> dict[str, Any]:
    """The never-disturbed run: every script's answers, every prompt's completion, every task's transcript
    (all at once: greedy outputs do not depend on what else is batched)."""
    job_id = submit_job(server, tally, n_tasks)
    with ThreadPoolExecutor(8, thread_name_prefix="chaos-reference") as pool:
        sessions = [pool.submit(run_session, server, tally, scripts, i, random.Random(i)) for i in range(len(scripts))]
        chats = [pool.submit(run_chat, server, tally, p, random.Random(0), 0.0) for p in prompts]
        ref: dict[str, Any] = {"sessions": [f.result().answers for f in sessions], "chat": [f.result() for f in chats]}
    ref["tasks"] = job_answers(server, tally, job_id)
    return ref


def submit_job(server: ChaosServer, tally: Tally, n_tasks: int) -> str:
    return _ok(tally, call(server, tally, "POST", "/v1/jobs", json=job_spec(n_tasks))).json()["id"]


class Unexpected(Exception):
    """An answer a valid request should never get (counted); the client drops what it was doing."""


def _ok(tally: Tally, r: httpx.Response) -> httpx.Response:
    """Requests of this workload are all valid: any 4xx is a server bug (e.g. an outage shown as 400)."""
    if r.status_code != 200:
        tally.add("client_errors", note=f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:200]}")
        raise Unexpected(f"{r.request.url.path}: {r.status_code} {r.text[:300]}")
    return r


def job_answers(server: ChaosServer, tally: Tally, job_id: str, timeout_s: float = 600) -> dict[str, Any]:
    """Waits for the job to end; each task's status and assistant contents in order."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = _ok(tally, call(server, tally, "GET", f"/v1/jobs/{job_id}")).json()
        if st["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.5)
    res = _ok(tally, call(server, tally, "GET", f"/v1/jobs/{job_id}/results")).json()["data"]
    return {r["task_id"]: {"status": r["status"], "error": r["error"],
                           "answers": [m.get("content") for m in r["transcript"] if m["role"] == "assistant"],
                           "users": [m.get("content") for m in r["transcript"] if m["role"] == "user"]} for r in res}


# -------------------------------------------------------------------------------------- the verdict


def judge_sessions(server: ChaosServer, tally: Tally, scripts: list[Script], records: list[SessionRecord],
                   ref: list[list[str | None]]) -> None:
    """Against the store: every turn the client saw committed is there once (lost, duplicated), and every
    stored answer is the reference's (wrong)."""
    for rec in records:
        msgs = _ok(tally, call(server, tally, "GET", f"/v1/sessions/{rec.session_id}")).json()["messages"]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        turns = scripts[rec.script].turns
        dup = len(users) - len(set(users)) + max(0, len(answers) - len(users))
        if dup:
            tally.add("duplicated", dup, note=f"session {rec.session_id}: {len(users)} user / {len(answers)} answers")
        seen = sum(a is not None for a in rec.answers)
        missing = [k for k, t in enumerate(turns[:len(rec.answers)]) if rec.answers[k] is not None and t not in users]
        if missing or seen > len(set(users)):
            tally.add("lost", max(len(missing), seen - len(set(users))), note=f"session {rec.session_id}: {missing}")
        for k, a in enumerate(answers[:len(turns)]):
            if a != ref[rec.script][k] or (k < len(rec.answers) and rec.answers[k] not in (None, a)):
                tally.add("wrong", note=f"session {rec.session_id} turn {k}: {a!r} != {ref[rec.script][k]!r}")


def judge_tasks(tally: Tally, got: dict[str, Any], ref: dict[str, Any]) -> None:
    for tid, want in ref.items():
        have = got.get(tid)
        if have is None or have["status"] != "done":
            tally.add("lost", note=f"task {tid}: {have and (have['status'], have['error'])}")
            continue
        tally.add("job_tasks")
        if len(have["users"]) != len(set(have["users"])) or len(have["answers"]) > len(want["answers"]):
            tally.add("duplicated", note=f"task {tid}: {len(have['answers'])} answers")
        elif have["answers"] != want["answers"]:
            tally.add("wrong", note=f"task {tid}: {have['answers']} != {want['answers']}")
