"""Placement policy of the tier stack, as plain functions of tier indices (0 = fastest below device).

Shared by TierStack (real bytes) and benchmarks/mooncake_sim.py (capacity counting), so the simulation
measures the policy the engine runs. No torch, no I/O.

- lookup: a prefix is served from the fastest tier holding each block; it ends at the first block
  that no tier holds (later blocks depend on it through the chain hash and attention).
- promote on hit: a block read from tier i is copied into tiers 0..i-1 (the copy below stays).
- write-on-evict: the engine offers a block when device memory evicts it; it goes to tier 0, and a
  block evicted from tier i for room is written down to tier i+1 (unless already there).
- write-through: the engine offers each block as soon as it is full; it goes to every tier, and tier
  evictions just drop (every lower tier already has its own copy, under its own LRU).
- write-behind (the default): write-on-evict, and in addition every block is written to the durable
  tiers (disk, remote) as soon as it is full, by the background mover behind the step loop, so a
  process killed after a turn finished finds its KV there on restart. The host tier is not written
  ahead: it dies with the process, and device evictions fill it as under write-on-evict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvstrata.core import KvstrataError

WRITE_POLICIES = ("write-behind", "write-on-evict", "write-through")


@dataclass(frozen=True)
class TierPolicy:
    write_policy: str = "write-behind"
    promote_on_hit: bool = True

    def __post_init__(self) -> None:
        if self.write_policy not in WRITE_POLICIES:
            raise KvstrataError(f"unknown write policy {self.write_policy!r}; choose one of {WRITE_POLICIES}")

    @property
    def offer_on_compute(self) -> bool:
        """True: the engine offers blocks when they fill; False: when device memory evicts them."""
        return self.write_policy == "write-through"

    def offer_targets(self, n_tiers: int) -> list[int]:
        """Tiers an offered block is written to."""
        if n_tiers == 0:
            return []
        return list(range(n_tiers)) if self.write_policy == "write-through" else [0]

    def durable_targets(self, durable: Sequence[bool]) -> list[int]:
        """Tiers a block is written to as soon as it fills, under write-behind: the durable ones."""
        return [i for i, d in enumerate(durable) if d] if self.write_policy == "write-behind" else []

    def promote_targets(self, hit_tier: int) -> list[int]:
        """Faster tiers that receive a copy of a block read from `hit_tier`."""
        return list(range(hit_tier)) if self.promote_on_hit else []

    def demote_target(self, from_tier: int, n_tiers: int) -> int | None:
        """Where a block evicted from `from_tier` is written, or None (dropped)."""
        if self.write_policy != "write-through" and from_tier + 1 < n_tiers:
            return from_tier + 1
        return None


def prefix_holders(found: Sequence[Sequence[bool]], n_keys: int) -> list[int]:
    """found[t][k]: tier t holds key k. For the leading keys held by some tier, the fastest such tier."""
    out: list[int] = []
    for k in range(n_keys):
        tier = next((t for t, f in enumerate(found) if f[k]), None)
        if tier is None:
            break
        out.append(tier)
    return out
