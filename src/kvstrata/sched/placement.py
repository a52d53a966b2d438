"""One cost model for where a paused session's KV lives: keep in device memory, move down a tier, or
drop and recompute later.

For a paused prefix of B bytes and N tokens, expected to wait W seconds, on a device pool under
pressure p (fraction in use):
  keep:          p * (B / pool_bytes) * W      machine-seconds of device memory withheld from others
  move to tier:  B / write_bw * WRITE_WEIGHT + B / read_bw    (the write overlaps compute in the
                 background mover; the reload is on the resumed turn's critical path)
  drop:          prefill_flops(N) / compute_rate             (recompute on resume)
The cheapest wins. Bandwidths and compute rate come from the machine calibration the planner uses
(`kvstrata plan calibrate`, planner/calibration.py), so the planner and the engine never disagree;
the expected wait per tool is learned from observed tool durations. Calibration never runs on the
engine's step loop: a saved profile is read at start, else conservative defaults serve until a
background thread has measured the machine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)

WRITE_WEIGHT = 0.25  # background writes cost a quarter of their time (they overlap compute)
MIN_PRESSURE = 0.1  # an idle pool still values memory: another session may arrive during the wait
DEFAULT_WAIT_S = 5.0  # prior for a tool never seen


@dataclass(frozen=True)
class Calibration:
    """Measured speeds: per-tier read / write GB/s and the compute rate for recompute (GFLOP/s)."""

    read_GBps: dict[str, float]
    write_GBps: dict[str, float]
    compute_GFLOPs: float
    source: str = "given"

    @classmethod
    def from_profile(cls, profile, redis_GBps: float = 1.0) -> "Calibration":
        """From the planner's MachineProfile. Redis throughput on loopback is taken as `redis_GBps`
        less its round trip per block; the host tier runs at the measured memory copy rate."""
        read = {"host": profile.host_copy_GBps, "disk": profile.disk_read_GBps, "remote": redis_GBps}
        write = {"host": profile.host_copy_GBps, "disk": profile.disk_write_GBps, "remote": redis_GBps}
        return cls(read, write, profile.matmul_fp32_GFLOPs, f"calibration {profile.measured_at}")


# Until this machine is measured: a slow disk and network, a fast host copy and a modest compute rate.
# Slow tiers make moving down look dear and a slow compute rate makes recompute look dear, so the
# defaults lean to keeping KV where it is, the choice that is never badly wrong for a short wait.
DEFAULT_CALIBRATION = Calibration(
    read_GBps={"host": 5.0, "disk": 0.5, "remote": 0.3}, write_GBps={"host": 5.0, "disk": 0.3, "remote": 0.3},
    compute_GFLOPs=50.0, source="conservative defaults (this machine not measured yet)")


def saved_calibration() -> Calibration | None:
    """The calibration saved by `kvstrata plan calibrate` (or an earlier background run); None if none
    was saved or the file is damaged. A file read: safe on the engine thread."""
    from kvstrata.planner.calibration import load_profile

    try:
        profile = load_profile()
    except KvstrataError as e:
        log.warning("%s; using defaults until it is measured again", e)
        return None
    return None if profile is None else Calibration.from_profile(profile)


def measure_calibration() -> Calibration:
    """Measures this machine (the quick calibration, 2-4 s) and saves it for later starts. Runs on a
    background thread with one torch thread (a second OpenMP team beside the engine's would make
    every engine op pay for oversubscription, see engine/async_engine.py)."""
    import torch

    from kvstrata.planner.calibration import calibrate, save_profile

    torch.set_num_threads(1)  # per-thread OpenMP setting: the engine thread keeps its own
    profile = calibrate(quick=True)
    try:
        save_profile(profile)
    except OSError as e:
        log.warning("could not save the calibration: %s", e)
    return Calibration.from_profile(profile)


def model_spec(mc):
    """The planner's description (planner.modelspec.ModelSpec) of an engine ModelConfig."""
    from kvstrata.planner.modelspec import ModelSpec

    return ModelSpec.from_hf_config({
        "num_hidden_layers": mc.num_layers, "hidden_size": mc.hidden_size, "num_attention_heads": mc.num_heads,
        "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "intermediate_size": mc.intermediate_size,
        "vocab_size": mc.vocab_size, "tie_word_embeddings": mc.tie_word_embeddings}, name=mc.name or "engine-model")


class ToolWaitModel:
    """Expected tool duration per tool name: an exponentially weighted mean of observed durations."""

    def __init__(self, alpha: float = 0.3, prior_s: float = DEFAULT_WAIT_S) -> None:
        self.alpha, self.prior_s = alpha, prior_s
        self.mean: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def observe(self, tool: str, seconds: float) -> None:
        m = self.mean.get(tool)
        self.mean[tool] = seconds if m is None else (1 - self.alpha) * m + self.alpha * seconds
        self.count[tool] = self.count.get(tool, 0) + 1

    def expected(self, tool: str | None) -> float:
        if tool is None:
            return self.prior_s
        return self.mean.get(tool, self.prior_s)


@dataclass
class Decision:
    action: str  # "keep" | a tier name | "drop"
    costs: dict[str, float]
    kv_bytes: int
    tokens: int
    expected_wait_s: float
    pressure: float
    reason: str = ""
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return asdict(self)


class PlacementModel:
    """The cost model. `calibration` None: the saved calibration if there is one, else DEFAULT_CALIBRATION
    and, at the first decision, a background measurement (`measure_calibration`) that replaces the
    defaults when done; a decision never waits for it. Give a Calibration to fix the numbers (tests)."""

    def __init__(self, calibration: Calibration | None, model_spec, tiers: list[str], history: int = 256) -> None:
        self.cal = calibration or saved_calibration() or DEFAULT_CALIBRATION
        self._measure = self.cal is DEFAULT_CALIBRATION  # measured in the background on first use
        self._measuring: threading.Thread | None = None
        self.spec = model_spec  # planner ModelSpec (for prefill FLOPs)
        self.tiers = list(tiers)
        self.waits = ToolWaitModel()
        self.decisions: deque[Decision] = deque(maxlen=history)
        self.counts: dict[str, int] = {}

    def _calibrate_in_background(self) -> None:
        if not self._measure or self._measuring is not None:
            return

        def run() -> None:
            try:
                self.cal = measure_calibration()  # one reference swap: decisions read whichever is there
                log.info("placement: machine calibrated in the background (%s)", self.cal.source)
            except Exception as e:  # noqa: BLE001 - the defaults stay; decisions go on
                log.warning("background calibration failed (%s); keeping %s", e, self.cal.source)

        self._measuring = threading.Thread(target=run, name="kvstrata-calibrate", daemon=True)
        self._measuring.start()

    def wait_calibrated(self, timeout: float | None = None) -> bool:
        """Block until a background measurement started by a decision is done (tests, benchmarks)."""
        if self._measuring is not None:
            self._measuring.join(timeout)
            return not self._measuring.is_alive()
        return True

    def costs(self, kv_bytes: int, tokens: int, wait_s: float, pressure: float, pool_bytes: int) -> dict[str, float]:
        from kvstrata.planner.cost import recompute_time_s, reload_time_s

        self._calibrate_in_background()
        p = max(pressure, MIN_PRESSURE)
        out = {"keep": p * kv_bytes / max(pool_bytes, 1) * wait_s}
        for t in self.tiers:
            r, w = self.cal.read_GBps.get(t, 0.0), self.cal.write_GBps.get(t, 0.0)
            if r > 0 and w > 0:
                out[t] = WRITE_WEIGHT * reload_time_s(kv_bytes, w) + reload_time_s(kv_bytes, r)
        out["drop"] = recompute_time_s(tokens, 0, self.spec, self.cal.compute_GFLOPs) if tokens else 0.0
        return out

    def preempt_choice(self, kv_bytes: int, tokens: int) -> Decision:
        """A preempted batch sequence must leave device memory: move its KV down, or drop and recompute."""
        costs = self.costs(kv_bytes, tokens, 0.0, 1.0, 1)
        costs.pop("keep")
        action = min(costs, key=costs.__getitem__)
        d = Decision(action, costs, kv_bytes, tokens, 0.0, 1.0, reason="preempt")
        self.decisions.append(d)
        self.counts["preempt:" + action] = self.counts.get("preempt:" + action, 0) + 1
        return d

    def decide(self, kv_bytes: int, tokens: int, tool: str | None, pressure: float, pool_bytes: int,
               wait_s: float | None = None) -> Decision:
        wait = self.waits.expected(tool) if wait_s is None else wait_s
        costs = self.costs(kv_bytes, tokens, wait, pressure, pool_bytes)
        action = min(costs, key=lambda k: (costs[k], k != "keep"))  # ties keep
        d = Decision(action, costs, kv_bytes, tokens, wait, pressure, reason=f"tool={tool}")
        self.decisions.append(d)
        self.counts[action] = self.counts.get(action, 0) + 1
        log.info("placement: %s for %d tokens (%d B), wait %.1fs, pressure %.2f, costs %s", action, tokens,
                 kv_bytes, wait, pressure, {k: round(v, 4) for k, v in costs.items()})
        return d

    def prefill_choice(self, new_tokens: int, context_tokens: int, kv_bytes: int,
                       transports: dict[str, tuple[float, float]]) -> Decision:
        """Prefill/decode disaggregation: compute `new_tokens` uncached prompt tokens (after
        `context_tokens` cached ones) on the decode replica ("local"), or have another replica compute
        them and hand their `kv_bytes` over a transport, name -> (GB/s, fixed latency s). Local costs the
        recompute on the decode replica's own step loop; a handover the transfer. Ties stay local."""
        from kvstrata.planner.cost import recompute_time_s, reload_time_s

        costs = {"local": recompute_time_s(new_tokens, context_tokens, self.spec, self.cal.compute_GFLOPs)
                 if new_tokens > 0 else 0.0}
        for name, (gbps, latency_s) in transports.items():
            if gbps > 0:
                costs[name] = reload_time_s(kv_bytes, gbps, latency_s)
        action = min(costs, key=lambda k: (costs[k], k != "local"))
        d = Decision(action, costs, kv_bytes, new_tokens, 0.0, 0.0, reason="prefill")
        self.counts["prefill:" + action] = self.counts.get("prefill:" + action, 0) + 1
        return d

    def stats(self) -> dict:
        return {"decisions": dict(self.counts), "expected_wait_s": dict(self.waits.mean), "calibration": self.cal.source,
                "last": [d.as_dict() for d in list(self.decisions)[-5:]]}
