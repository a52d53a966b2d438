"""Replay the Mooncake FAST'25 synthetic trace through the tier stack's policy as a cache simulation.

Each request's `hash_ids` are its 512-token blocks (equal ids = equal prefix blocks). Every level
(device, then the TierStack's tiers: host, disk) is an LRU counted in blocks; no model, no bytes.
The placement rules are kvstrata.tiers.policy.TierPolicy, the same object TierStack uses:
lookup = fastest level per block, stopping at the first block no level holds; hits in a tier are
promoted to the faster tiers; write-on-evict: device victims go to host, host victims to disk;
write-through: computed blocks go to every tier. The mover is assumed never to drop (infinite
bandwidth), so these are upper bounds on what the policy can reach at each capacity.

Reports the token hit rate per level beside the trace's ideal (infinite cache) hit rate and writes
benchmarks/results/mooncake_sim.md and .png.

    PYTHONPATH=src .venv/bin/python -m benchmarks.mooncake_sim
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import trace_dir
from kvstrata.tiers.policy import TierPolicy, prefix_holders

logger = logging.getLogger(__name__)

TRACE = trace_dir() / "mooncake" / "synthetic_trace.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_TOKENS = 512
# For scale: Llama-3.1-8B in bf16 holds 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes
# = 128 KiB per token (config.json of meta-llama/Llama-3.1-8B), so one 512-token block = 64 MiB.
GIB_PER_BLOCK = 512 * 128 * 1024 / 2**30


class LRU:
    """A set of block ids with a capacity in blocks; least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.d: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, k: int) -> bool:
        return k in self.d

    def touch(self, k: int) -> None:
        self.d.move_to_end(k)

    def insert(self, k: int, pinned: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
        """Add `k`; returns the evicted ids (never a pinned one). If everything is pinned, `k` is the victim."""
        if k in self.d:
            self.d.move_to_end(k)
            return []
        self.d[k] = None
        victims: list[int] = []
        it = iter(self.d)
        while len(self.d) > self.capacity:
            v = next((x for x in it if x not in pinned or x == k), None)
            if v is None:
                break
            del self.d[v]
            victims.append(v)
            it = iter(self.d)
        return victims


@dataclass
class SimResult:
    name: str
    device: int
    tiers: list[int]
    policy: str
    tokens: int = 0
    hit_tokens: dict[str, int] = field(default_factory=dict)

    def rate(self, level: str) -> float:
        return self.hit_tokens.get(level, 0) / self.tokens if self.tokens else 0.0

    @property
    def total_rate(self) -> float:
        return sum(self.hit_tokens.values()) / self.tokens if self.tokens else 0.0


class Simulation:
    """Device LRU + TierStack-policy tiers, all counted in blocks."""

    def __init__(self, device_blocks: int, tier_blocks: list[int], tier_names: list[str], policy: TierPolicy):
        self.device = LRU(device_blocks)
        self.tiers = [LRU(c) for c in tier_blocks]
        self.names = tier_names
        self.policy = policy

    def _put(self, i: int, k: int) -> None:
        """Write block k into tier i (skipped if present, like the mover); cascade its victims."""
        if k in self.tiers[i]:
            return
        for v in self.tiers[i].insert(k):
            j = self.policy.demote_target(i, len(self.tiers))
            if j is not None:
                self._put(j, v)

    def _offer(self, k: int) -> None:
        for i in self.policy.offer_targets(len(self.tiers)):
            self._put(i, k)

    def request(self, hash_ids: list[int], input_length: int) -> dict[str, int]:
        """Serve one request; returns hit tokens per level ("device" or a tier name)."""
        levels = [self.device, *self.tiers]
        found = [[h in lvl for h in hash_ids] for lvl in levels]
        holders = prefix_holders(found, len(hash_ids))
        hits: dict[str, int] = {}
        pinned = set(hash_ids)  # the running request's blocks stay in device memory
        for j, h in enumerate(hash_ids):
            ntok = min(BLOCK_TOKENS, input_length - j * BLOCK_TOKENS)
            if j < len(holders):
                lvl = holders[j]
                name = "device" if lvl == 0 else self.names[lvl - 1]
                hits[name] = hits.get(name, 0) + ntok
                if lvl > 0:  # a tier hit: promote to faster tiers
                    for i in self.policy.promote_targets(lvl - 1):
                        self._put(i, h)
            elif self.policy.offer_on_compute:  # computed now: write-through offers it at once
                self._offer(h)
            for v in self.device.insert(h, pinned):
                if not self.policy.offer_on_compute:  # write-on-evict: device victims go down
                    self._offer(v)
        return hits


def load_trace(path: Path) -> list[tuple[list[int], int]]:
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out.append((r["hash_ids"], int(r["input_length"])))
    return out


def ideal_hit_rate(trace: list[tuple[list[int], int]]) -> float:
    """Infinite cache: a block hits if its id was seen before and every block before it hit."""
    seen: set[int] = set()
    hit = total = 0
    for ids, n in trace:
        total += n
        k = 0
        while k < len(ids) and ids[k] in seen:
            k += 1
        hit += min(k * BLOCK_TOKENS, n)
        seen.update(ids)
    return hit / total


def simulate(trace, name: str, device: int, tiers: list[int], policy: str) -> SimResult:
    names = ["host", "disk", "remote"][: len(tiers)]
    sim = Simulation(device, tiers, names, TierPolicy(policy))
    res = SimResult(name, device, tiers, policy)
    for ids, n in trace:
        res.tokens += n
        for k, v in sim.request(ids, n).items():
            res.hit_tokens[k] = res.hit_tokens.get(k, 0) + v
    return res


CONFIGS = [  # (label, device blocks, [host, disk] blocks, policy)
    ("device 512", 512, [], "write-on-evict"),
    ("device 1024", 1024, [], "write-on-evict"),
    ("device 2048", 2048, [], "write-on-evict"),
    ("device 1024 + host 2048", 1024, [2048], "write-on-evict"),
    ("device 1024 + host 4096", 1024, [4096], "write-on-evict"),
    ("device 1024 + host 8192", 1024, [8192], "write-on-evict"),
    ("device 1024 + host 4096 + disk 8192", 1024, [4096, 8192], "write-on-evict"),
    ("device 1024 + host 4096 + disk 16384", 1024, [4096, 16384], "write-on-evict"),
    ("device 1024 + host 4096 + disk 32768", 1024, [4096, 32768], "write-on-evict"),
    ("device 1024 + host 4096 + disk 65536", 1024, [4096, 65536], "write-on-evict"),
    ("device 1024 + host 4096 + disk 16384 (write-through)", 1024, [4096, 16384], "write-through"),
    ("device 1024 + host 4096 + disk 65536 (write-through)", 1024, [4096, 65536], "write-through"),
]


def write_report(results: list[SimResult], ideal: float, n_req: int, n_unique: int, out_dir: Path) -> None:
    lines = [
        "# Mooncake synthetic trace through the TierStack policy (cache simulation)",
        "",
        f"Trace: {TRACE.name}, {n_req} requests, {n_unique} unique 512-token blocks "
        f"({n_unique * GIB_PER_BLOCK:.0f} GiB at Llama-3.1-8B bf16, 64 MiB per block). "
        f"Ideal (infinite cache, prefix-only) token hit rate: **{ideal:.1%}**.",
        "",
        "Capacities in 512-token blocks (GiB at 64 MiB per block). Hit rate = share of all input tokens "
        "served from each level instead of recomputed.",
        "",
        "| configuration | policy | device | host | disk | total | of ideal |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.policy} | {r.rate('device'):.1%} | {r.rate('host'):.1%} | "
                     f"{r.rate('disk'):.1%} | **{r.total_rate:.1%}** | {r.total_rate / ideal:.0%} |")
    lines += ["", "Command: `PYTHONPATH=src .venv/bin/python -m benchmarks.mooncake_sim`", ""]
    (out_dir / "mooncake_sim.md").write_text("\n".join(lines))


def plot(results: list[SimResult], ideal: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    names = [r.name.replace(" + ", "\n+ ").replace(" (", "\n(") for r in results]
    bottom = [0.0] * len(results)
    for level, color in (("device", "#1f77b4"), ("host", "#ff7f0e"), ("disk", "#2ca02c")):
        vals = [100 * r.rate(level) for r in results]
        ax.bar(names, vals, bottom=bottom, label=level, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(100 * ideal, color="k", ls="--", label=f"ideal (infinite cache) {ideal:.1%}")
    ax.set_ylabel("token hit rate (%)")
    ax.set_ylim(0, 100 * ideal + 20)
    ax.set_title("Mooncake synthetic trace: token hit rate per tier (512-token blocks)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    trace = load_trace(args.trace)
    ideal = ideal_hit_rate(trace)
    n_unique = len({h for ids, _ in trace for h in ids})
    results = []
    for name, dev, tiers, policy in CONFIGS:
        r = simulate(trace, name, dev, tiers, policy)
        results.append(r)
        print(f"{name:55s} device {r.rate('device'):6.1%} host {r.rate('host'):6.1%} "
              f"disk {r.rate('disk'):6.1%} total {r.total_rate:6.1%} (ideal {ideal:.1%})")
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(results, ideal, len(trace), n_unique, args.out)
    plot(results, ideal, args.out / "mooncake_sim.png")
    print(f"wrote {args.out / 'mooncake_sim.md'} and .png in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
