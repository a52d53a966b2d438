"""The faults, on a timeline: SIGKILL and restart, a session-store outage, a Redis outage, corrupt and
missing disk-tier files. Client cancellations are the clients' own (workload.py)."""

from __future__ import annotations

import itertools
import logging
import random
import sqlite3
import threading
import time
from pathlib import Path

from tests.chaos.harness import ChaosServer

log = logging.getLogger(__name__)
KINDS = ("kill", "corrupt_tier", "store_outage", "redis_outage", "corrupt_tier", "kill")


def corrupt_tier(kv_dir: Path, rng: random.Random, share: float = 0.3) -> dict[str, int]:
    """A `share` of the block files: a flipped byte, cut short, or removed (a third each)."""
    files = sorted(kv_dir.rglob("*.kvb"))
    done = {"flipped": 0, "truncated": 0, "removed": 0}
    for p in rng.sample(files, int(len(files) * share)):
        what = rng.choice(sorted(done))
        try:
            if what == "removed":
                p.unlink()
            else:
                data = bytearray(p.read_bytes())
                if what == "flipped":
                    data[rng.randrange(len(data))] ^= 0xFF
                else:
                    data = data[: rng.randrange(len(data))]
                p.write_bytes(bytes(data))
            done[what] += 1
        except OSError:  # the server evicted it meanwhile
            pass
    return done


def hold_store_lock(db: Path, seconds: float) -> None:
    """An outage of the SQLite store: another process's writer holds the database for longer than the
    server's busy timeout, so its writes fail (503 store_unavailable) until it lets go."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


class Faults(threading.Thread):
    """The faults of `plan`, one after another with a jittered gap of `gap_s` before each; `repeat`: over
    again until stopped. Records what it did and when; `done` is set when a plan without repeat ends."""

    def __init__(self, server: ChaosServer, redis, rng: random.Random, gap_s: float, outage_s: float = 3.0,
                 plan: tuple[str, ...] = KINDS, repeat: bool = False) -> None:
        super().__init__(daemon=True, name="chaos-faults")
        self.server, self.redis, self.rng = server, redis, rng
        self.gap_s, self.outage_s, self.plan, self.repeat = gap_s, outage_s, plan, repeat
        self.events: list[tuple[float, str, str]] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._halt = threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        try:
            for i in itertools.count():
                if (i >= len(self.plan) and not self.repeat) or self._halt.wait(self.gap_s * self.rng.uniform(0.6, 1.4)):
                    break
                kind = self.plan[i % len(self.plan)]
                self.events.append((round(time.time() - self.t0, 1), kind, self._do(kind)))
        except BaseException as e:  # surfaced by the run
            self.error = e
            log.exception("fault injection failed")
        finally:
            self.done.set()

    def _do(self, kind: str) -> str:
        s = self.server
        if kind == "kill":
            s.kill()
            time.sleep(self.rng.uniform(0.1, 1.0))
            s.start()
            return f"SIGKILL, restart #{s.starts - 1}"
        if kind == "store_outage":
            hold_store_lock(s.db, self.outage_s)
            return f"store locked {self.outage_s:g} s"
        if kind == "redis_outage":
            self.redis.stop()
            time.sleep(self.outage_s)
            self.redis.start()
            return f"redis down {self.outage_s:g} s"
        done = corrupt_tier(s.kv_dir, self.rng)
        return ", ".join(f"{k} {v}" for k, v in done.items())

    def stop(self) -> None:
        self._halt.set()
        self.join(180)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, k, _ in self.events:
            out[k] = out.get(k, 0) + 1
        return out
