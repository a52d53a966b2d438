"""Paused sessions: where a waiting agent's KV lives until it resumes (the placement cost model decides).

pause(token_ids, tool) asks sched/placement.py for keep / a tier / drop and carries it out:
  keep: the prefix's device blocks get an extra reference, so the LRU cannot evict them;
  tier: the blocks are written to that tier (pinned for the wait) and their device copies freed;
  drop: the device copies are freed without writing; the prefix is recomputed on resume.
resume(token_ids) undoes the hold, or prefetches the parked blocks back into device memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kvstrata.core import chain_keys
from kvstrata.kv.pool import BlockPool

log = logging.getLogger(__name__)


@dataclass
class _Paused:
    action: str
    blocks: list[int] = field(default_factory=list)  # held device blocks (action == "keep")


class PausedSessions:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.pool: BlockPool = engine.pool
        self.paused: dict[bytes, _Paused] = {}
        self._model = None

    @property
    def model(self):
        """The placement model, built on first use (loads or measures the machine calibration)."""
        if self._model is None:
            from kvstrata.planner.modelspec import ModelSpec
            from kvstrata.sched.placement import PlacementModel, load_calibration

            mc = self.engine.model_config
            spec = ModelSpec.from_hf_config({
                "num_hidden_layers": mc.num_layers, "hidden_size": mc.hidden_size,
                "num_attention_heads": mc.num_heads, "num_key_value_heads": mc.num_kv_heads,
                "head_dim": mc.head_dim, "intermediate_size": mc.intermediate_size, "vocab_size": mc.vocab_size,
                "tie_word_embeddings": mc.tie_word_embeddings}, name=mc.name or "engine-model")
            tiers = self.engine.offload.tier_names if self.engine.offload else []
            self._model = PlacementModel(load_calibration(), spec, tiers)
        return self._model

    def set_model(self, model) -> None:
        """Install a placement model (tests use controlled calibrations)."""
        self._model = model

    def _chain(self, token_ids: list[int]) -> list[bytes]:
        return chain_keys(token_ids, self.pool.block_size, self.engine.fingerprint)

    def pause(self, token_ids: list[int], tool: str | None = None, wait_s: float | None = None) -> dict:
        keys = self._chain(token_ids)
        if not keys:
            return {"action": "none", "reason": "shorter than one block"}
        self.resume(token_ids, prefetch=False)  # a second pause of the same prefix replaces the first
        per_block = self.pool.block_bytes
        pressure = self.pool.num_in_use / self.pool.num_blocks
        d = self.model.decide(per_block * len(keys), len(keys) * self.pool.block_size, tool, pressure,
                              per_block * self.pool.num_blocks, wait_s)
        state = _Paused(d.action)
        if d.action == "keep":
            for k in keys:
                b = self.pool.key_to_block.get(k)
                if b is None:
                    break
                self.pool.acquire(b)
                state.blocks.append(b)
        elif d.action == "drop":
            for k in keys:
                b = self.pool.key_to_block.get(k)
                if b is not None and self.pool.ref_count[b] == 0:
                    self.pool.drop_cached(b)
        else:
            self.engine.park(token_ids, d.action, pin=True)
        self.paused[keys[-1]] = state
        return d.as_dict()

    def resume(self, token_ids: list[int], prefetch: bool = True) -> int:
        """Ends a pause; returns the prefix tokens now in device memory ready for the next turn."""
        keys = self._chain(token_ids)
        # the session grew since it paused: find the longest paused prefix
        state, n = None, 0
        for i in range(len(keys), 0, -1):
            state = self.paused.pop(keys[i - 1], None)
            if state is not None:
                n = i
                break
        if state is None:
            return 0
        if state.action == "keep":
            for b in state.blocks:
                self.pool.release(b)
            return len(state.blocks) * self.pool.block_size
        if state.action not in ("drop",) and self.engine.offload is not None:
            self.engine.unpin(token_ids[: n * self.pool.block_size], state.action)
            if prefetch:
                return self.engine.prefetch(token_ids)
        return 0

    def record_tool_duration(self, tool: str, seconds: float) -> None:
        self.model.waits.observe(tool, seconds)

    def stats(self) -> dict:
        if self._model is None:
            return {"paused": len(self.paused)}
        m = self._model
        return {"paused": len(self.paused), "decisions": dict(m.counts),
                "expected_wait_s": dict(m.waits.mean), "calibration": m.cal.source,
                "last": [d.as_dict() for d in list(m.decisions)[-5:]]}
