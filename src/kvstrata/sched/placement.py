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
the expected wait per tool is learned from observed tool durations.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field

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


def load_calibration() -> Calibration:
    """The saved calibration of this machine, measured (quick) and saved on first use."""
    from kvstrata.planner.calibration import calibrate, load_profile, save_profile

    profile = load_profile()
    if profile is None:
        log.info("no machine calibration found; measuring one (kvstrata plan calibrate does it fully)")
        profile = calibrate(quick=True)
        try:
            save_profile(profile)
        except OSError as e:
            log.warning("could not save the calibration: %s", e)
    return Calibration.from_profile(profile)


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
    def __init__(self, calibration: Calibration, model_spec, tiers: list[str], history: int = 256) -> None:
        self.cal = calibration
        self.spec = model_spec  # planner ModelSpec (for prefill FLOPs)
        self.tiers = list(tiers)
        self.waits = ToolWaitModel()
        self.decisions: deque[Decision] = deque(maxlen=history)
        self.counts: dict[str, int] = {}

    def costs(self, kv_bytes: int, tokens: int, wait_s: float, pressure: float, pool_bytes: int) -> dict[str, float]:
        from kvstrata.planner.cost import recompute_time_s, reload_time_s

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
