"""The chaos run: a reference run, the same workload under faults, then a soak; one report.

    python -m tests.chaos.run                      # the long form: 10 minutes, 64 clients (make chaos)
    python -m tests.chaos.run --minutes 2 --clients 16 --out chaos-quick.md

The server is `kvstrata serve` as a process (SQLite store, disk tier written through, host tier, a real
Redis), on the tiny random-weight model of the tests unless `--model` names another (`default`: the
default model in fp32). Every turn, completion and job task is checked against the reference run:
lost, duplicated and wrong outputs, server errors (5xx other than the 503s a store outage must
answer) and client errors (every request of the workload is valid: a 4xx would be the server's
fault, e.g. an outage answered as a bad request) must all be 0. tests/chaos/test_chaos.py runs a short form of it in `make test`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.chaos import workload as wl  # noqa: E402
from tests.chaos.faults import Faults  # noqa: E402
from tests.chaos.harness import ChaosServer, ProcSampler, Tally  # noqa: E402

MUST_BE_ZERO = ("lost", "duplicated", "wrong", "server_errors", "client_errors")


@dataclass
class ChaosConfig:
    model: str
    workdir: Path
    duration_s: float = 20.0  # clients under faults: at least this long, and until the fault plan is done
    soak_s: float = 10.0  # then soak_clients, no faults
    clients: int = 12
    soak_clients: int = 64
    fault_gap_s: float = 2.5
    outage_s: float = 2.5
    repeat_faults: bool = False  # the plan (faults.KINDS) once, or over again for duration_s
    scripts: int = 8
    turns: int = 3
    prompts: int = 8
    tasks: int = 4
    cancel_p: float = 0.15
    seed: int = 1


def _clients(server: ChaosServer, tally: Tally, cfg: ChaosConfig, scripts, prompts, n: int, seconds: float,
             sessions: list, chats: list, counter, until=None) -> None:
    """n clients for `seconds` (and until `until` is set): a scripted session (two in three) or a chat
    completion each time."""
    end = time.time() + seconds

    def client(i: int) -> None:
        rng = random.Random(cfg.seed * 1000 + i + len(sessions))
        while time.time() < end or (until is not None and not until.is_set()):
            j = next(counter)
            try:
                if j % 3 != 2:
                    sessions.append(wl.run_session(server, tally, scripts, j % len(scripts), rng, cfg.cancel_p))
                else:
                    chats.append((j % len(prompts), wl.run_chat(server, tally, prompts[j % len(prompts)], rng,
                                                                 cfg.cancel_p)))
            except wl.Unexpected:  # counted as a client error; the next one
                pass

    with ThreadPoolExecutor(n, thread_name_prefix="chaos-client") as pool:
        for f in [pool.submit(client, i) for i in range(n)]:
            f.result()


def run_chaos(cfg: ChaosConfig, redis) -> dict[str, Any]:
    """Phase 1, no faults: the reference run of every script, prompt and task (cold: nothing cached).
    Phase 2: the same workload (now from the tiers, whose files the faults corrupt) under faults.
    Phase 3: the soak, no faults. Then everything is checked against phase 1."""
    t_start = time.time()
    scripts, prompts = wl.session_scripts(cfg.scripts, cfg.turns), wl.chat_prompts(cfg.prompts)
    server = ChaosServer(cfg.model, _fresh(cfg.workdir / "chaos"), redis.url)
    tally, sessions, chats = Tally(), [], []
    server.start()
    sampler = ProcSampler(server)
    faults = Faults(server, redis, random.Random(cfg.seed), cfg.fault_gap_s, cfg.outage_s, repeat=cfg.repeat_faults)
    try:
        ref = wl.reference(server, Tally(), scripts, prompts, cfg.tasks)
        t_ref = time.time() - t_start
        job_id = wl.submit_job(server, tally, cfg.tasks)
        t_sampler = time.time()
        sampler.start()
        faults.start()
        counter = itertools.count()
        _clients(server, tally, cfg, scripts, prompts, cfg.clients, cfg.duration_s, sessions, chats, counter,
                 until=None if cfg.repeat_faults else faults.done)
        faults.stop()
        if faults.error is not None:
            raise faults.error
        if not server.up.is_set():
            server.start()
        soak_from = time.time() - t_sampler
        _clients(server, tally, cfg, scripts, prompts, cfg.soak_clients, cfg.soak_s, sessions, chats, counter)
        tasks = wl.job_answers(server, tally, job_id)
        wl.judge_sessions(server, tally, scripts, sessions, ref["sessions"])
        for idx, got in chats:
            if got != ref["chat"][idx]:
                tally.add("wrong", note=f"chat {idx}: {got!r} != {ref['chat'][idx]!r}")
        wl.judge_tasks(tally, tasks, ref["tasks"])
        resources = sampler.summary(since_s=soak_from)
    finally:
        faults.stop()
        sampler.stop()
        server.stop()
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "counts": tally.counts, "notes": tally.notes, "faults": faults.kinds(), "fault_log": faults.events,
            "resources": resources, "server_starts": server.starts, "sessions": len(sessions), "chats": len(chats),
            "seconds": {"reference": round(t_ref, 1), "total": round(time.time() - t_start, 1)},
            "passed": all(tally.counts[k] == 0 for k in MUST_BE_ZERO), "log_tail": server.log_tail(3000)}


def _fresh(d: Path) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def markdown(rep: dict[str, Any]) -> str:
    c, cfg = rep["counts"], rep["config"]
    res = rep["resources"]
    lines = [
        "# Chaos run", "",
        f"`python -m tests.chaos.run` ({'passed' if rep['passed'] else 'FAILED'}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}):",
        f"model `{Path(cfg['model']).name}`, {cfg['clients']} clients for {cfg['duration_s']:g} s under faults, then "
        f"{cfg['soak_clients']} clients for {cfg['soak_s']:g} s without; a fault every ~{cfg['fault_gap_s']:g} s; "
        f"{cfg['cancel_p']:.0%} of requests first cancelled by their client at a random point.", "",
        "| must be 0 | count |", "|---|---:|",
        *[f"| {k} | {c[k]} |" for k in MUST_BE_ZERO], "",
        "| what happened | count |", "|---|---:|",
        *[f"| {k} | {v} |" for k, v in c.items() if k not in MUST_BE_ZERO],
        f"| sessions / chat completions | {rep['sessions']} / {rep['chats']} |",
        f"| server starts (SIGKILLs + 1) | {rep['server_starts']} |",
        *[f"| fault: {k} | {v} |" for k, v in rep["faults"].items()], "",
        "Resources of the server process over the soak (first / peak / last sample):", "",
        "| | first | peak | last |", "|---|---:|---:|---:|",
        *[f"| {k} | {v['first']:.0f} | {v['peak']:.0f} | {v['last']:.0f} |" for k, v in res.items()], "",
        f"Server start and reference run {rep['seconds']['reference']} s; everything {rep['seconds']['total']} s.", "",
    ]
    if rep["notes"]:
        lines += ["Notes (first 50):", "", *[f"- {n}" for n in rep["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="whole run length (default 10); the last fifth is the soak")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--model", default="tiny", help="tiny (a random-weight test model), default, or a path")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "chaos.md"), help="the Markdown report")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    from tests.support.redis_server import RedisServer

    work = Path(tempfile.mkdtemp(prefix="kvstrata-chaos-"))
    model = a.model
    if model == "tiny":
        from tests.conftest import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(work / "tiny-model"))
    total = a.minutes * 60
    cfg = ChaosConfig(model, work, duration_s=total * 0.8, soak_s=total * 0.2, clients=a.clients,
                      soak_clients=a.clients, fault_gap_s=8.0, outage_s=4.0, repeat_faults=True, scripts=32, turns=4,
                      prompts=32, tasks=12, seed=a.seed)
    redis = RedisServer().start()
    try:
        rep = run_chaos(cfg, redis)
    finally:
        redis.close()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(markdown(rep))
    (work / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    print(markdown(rep))
    print(f"report: {a.out}; details: {work / 'report.json'}")
    shutil.rmtree(work / "chaos" / "kv", ignore_errors=True)
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
