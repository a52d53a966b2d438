"""The synchronous engine: add requests, step (schedule -> run model -> sample -> update), collect outputs.

On the CPU fast path (int8 weights from the layout cache, the native step) the engine is built and runs
without importing torch: the native step reads the layout's arrays, the KV pool is numpy over anonymous
maps, greedy sampling is numpy. torch (~1.1 s to import on a 2-core machine, most of a 1.6 s start) is
imported only when something needs it: a sampled or grammar-constrained request, logprobs, a KV tier,
the torch path (`model`, built from the same arrays on first use), or the torch views of the pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Sequence as Seq

from kvstrata.config import EngineConfig
from kvstrata.core import (
    CompletionOutput,
    ContextLengthError,
    FinishReason,
    KvstrataError,
    RequestClass,
    RequestOutput,
    SamplingParams,
)
from kvstrata.engine.runner import ModelRunner
from kvstrata.engine.sampler import Sampler, next_token
from kvstrata.engine.speculative import (MAX_DRAFT, DraftStats, NgramDrafter, OutputHistory, StepCost, draft_budget,
                                         expected_accepted)
from kvstrata.engine.setup import (auto_quantization, device_dtype_names, device_type, keep_freed_host_memory,
                                   pool_blocks, resolve_kv_dtype, trim_freed_host_memory)
from kvstrata.engine.weights import EngineWeights
from kvstrata.kv.manager import KVManager
from kvstrata.kv.offload import Offload, build_tier_stack
from kvstrata.kv.pool import BlockPool
from kvstrata.loader import load_model
from kvstrata.sched.placement import PlacementModel, model_spec
from kvstrata.sched.scheduler import Scheduler
from kvstrata.sched.sequence import Sequence
from kvstrata.startup import Phases, arena_key, gc_paused, release_gc, remember_arena
from kvstrata.tokenizer.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    seqs: list[Sequence]


class LLMEngine(EngineWeights):
    def __init__(self, config: EngineConfig | None = None, loaded=None, **overrides) -> None:
        """`loaded`: an already-built LoadedModel (e.g. random weights made on the GPU by a benchmark)
        used instead of reading `config.model`."""
        with gc_paused():  # (long-lived objects only: see startup.py)
            self._build(config or EngineConfig(**overrides), loaded)
        release_gc()
        if self.device_type == "cpu":
            trim_freed_host_memory()  # (what the build freed since the tokenizer: the native step's setup, a first start's float copies)

    def _build(self, cfg: EngineConfig, loaded) -> None:
        # the settings as given (the command line names them so before the engine resolves `auto`)
        hint_key = arena_key(cfg.model, cfg.quantization, cfg.device, cfg.dtype)
        self.device_name, self.dtype_name = device_dtype_names(cfg)  # ("cpu", "float32"): torch not needed
        self.device_type = device_type(self.device_name)
        if cfg.quantization == "auto":  # resolved once, so the fingerprint and the config name the real mode
            cfg = dataclasses.replace(cfg, quantization=auto_quantization(self.device_name, self.dtype_name))
        self.config = cfg
        phases = Phases()
        lm = loaded if loaded is not None else load_model(cfg.model, self.dtype_name)
        phases.mark("metadata")
        self.model_config = mc = lm.config
        self.model_path = lm.path
        self.quantization = lm.quantization
        self._load_weights(lm)  # (with glibc's own thresholds: a first start's build frees a layer's copies)
        if self.device_type == "cpu":
            keep_freed_host_memory()
        phases.mark("weights")
        self.tokenizer = lm.tokenizer  # (loaded meanwhile, see loader/gguf_loader.py)
        if self.device_type == "cpu":
            trim_freed_host_memory()
        phases.mark("tokenizer")
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        if mc.sliding_window and self.max_model_len > mc.sliding_window:
            log.warning("capping max_model_len to the model's sliding window %d", mc.sliding_window)
            self.max_model_len = mc.sliding_window
        if self._model is not None:
            self._set_rope(self._model)
        # The fingerprint names everything that makes a KV block's bytes what they are (dtypes as torch
        # names them: "torch.float32", as caches written before have them).
        fp = hashlib.sha256()
        self.kv_dtype_name = resolve_kv_dtype(cfg, self.dtype_name, cfg.quantization)
        for part in (lm.source_id, f"torch.{self.dtype_name}", "layout:LBSHD", cfg.block_size, mc.rope_theta,
                     mc.rope_scaling, cfg.quantization):
            fp.update(str(part).encode())
        if self.kv_dtype_name != self.dtype_name:  # (only then, so caches written before this option keep their name)
            fp.update(f"kv:torch.{self.kv_dtype_name}".encode())
        self.fingerprint = fp.hexdigest()
        nblocks = pool_blocks(cfg, mc, self.kv_dtype_name, self.device_name, self.max_model_len)
        self.pool = BlockPool(nblocks, cfg.block_size, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.kv_dtype_name,
                              self.device_name)
        self.kv = KVManager(self.pool, self.fingerprint, cfg.enable_prefix_caching)
        phases.mark("rope+pool")
        stack = build_tier_stack(cfg, self.fingerprint, self.pool)
        self.offload = Offload(self.pool, stack, self.fingerprint) if stack is not None else None
        self.kv.offload = self.offload
        phases.mark("tiers")
        # the one cost model (keep / move down / drop): preemption here, paused sessions in sessions/kv.py
        self.placement = PlacementModel(None, model_spec(mc), self.offload.tier_names if self.offload else [])
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.program_priority)
        self.scheduler.on_preempt = self._on_preempt
        self.runner = ModelRunner(self._get_model, self.kv, self.device_name)
        self.runner.native = self._native_step(self.pool)
        if self.runner.native is not None and loaded is None:  # the next start of these settings backs it early
            remember_arena(hint_key, self.runner.native.weight_bytes)
        phases.mark("native step")  # (what the native step's setup freed is trimmed once the build is done)
        self.start_phases = phases
        self.sampler = Sampler()
        self.speculative = cfg.speculative != "off" and self.runner.native is not None
        if cfg.speculative == "on" and not self.speculative:
            raise KvstrataError("--speculative on needs the native step (CPU, float32 compute, a C compiler); "
                                "use auto or off")
        # earlier outputs drafts may come from (engine/speculative.py)
        self.shared_outputs = (OutputHistory(cfg.speculative_shared) if self.speculative and cfg.speculative_shared
                               else None)
        self.draft_stats = DraftStats()  # acceptance per kind of draft, learned over this engine's requests
        self.step_cost = (StepCost.of(mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim, self.pool.element_size,
                                      self.runner.native.weight_bytes, amx=self.runner.native.amx)
                          if self.speculative else None)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(mc.eos_token_ids)
        self.counters = {"prompt_tokens": 0, "computed_prompt_tokens": 0, "cached_prompt_tokens": 0,
                         "generated_tokens": 0, "steps": 0, "preemptions": 0, "draft_tokens": 0,
                         "accepted_draft_tokens": 0}
        log.info("engine ready in %.1fs: %s, KV pool up to %d blocks of %d tokens (%.0f MiB, committed as used), "
                 "device %s, dtype %s, quantization %s, native decode %s", phases.total, mc.name or cfg.model, nblocks,
                 cfg.block_size, nblocks * self.pool.block_bytes / 2**20, self.device_name,
                 self.dtype_name if self.kv_dtype_name == self.dtype_name else f"{self.dtype_name}, KV {self.kv_dtype_name}",
                 cfg.quantization, "on" if self.runner.native is not None else "off")
        log.debug("start phases (s): %s%s", phases.report(), "" if "torch" in sys.modules else " (torch not imported)")

    # -- requests ---------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.INTERACTIVE,
        program: str | None = None,
    ) -> str:
        """Queue a request; `program` names the agent program it belongs to (a session, a job task), which
        orders admission (sched/scheduler.py). Returns its id."""
        params = params or SamplingParams()
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise KvstrataError(f"request id {rid!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self._validate_prompt(ids, params)
        rc = RequestClass(request_class)
        seqs = [Sequence(rid, i, list(ids), params, rc, program=program) for i in range(params.n)]
        for s in seqs:
            s.detok = IncrementalDetokenizer(self.tokenizer, ids)
            if params.structured is not None:
                from kvstrata.engine.structured import build_processor

                s.logits_processor = build_processor(params.structured, self.tokenizer, self.model_config.vocab_size)
            self.scheduler.add(s)
        self.requests[rid] = _Request(rid, text, seqs)
        return rid

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise KvstrataError("the prompt is empty; give at least one token")
        V = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise KvstrataError(f"prompt token ids out of range [0, {V}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len} tokens "
                "(prompt plus at least one generated token); shorten the prompt"
            )
        need = self.kv.blocks_needed(min(len(ids) + params.max_tokens, self.max_model_len))
        if need > self.pool.num_blocks:
            raise ContextLengthError(
                f"this request needs up to {need} KV blocks but the device pool has {self.pool.num_blocks}; "
                "lower max_tokens, shorten the prompt, or raise --kv-device-bytes"
            )

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for s in req.seqs:
            if not s.is_finished:
                s.finish_reason = FinishReason.ABORT
                self.scheduler.finish(s)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.speculative:
            if self.runner.native is None:  # (the native step failed: the torch path is not exact)
                self.speculative, self.shared_outputs = False, None
                for seq in self.scheduler.running:
                    seq.draft_token_ids = []
            else:
                self._propose_drafts()
        so = self.scheduler.schedule()
        self.counters["preemptions"] += len(so.preempted)
        if so.empty:
            return []
        now = time.time()
        for s in so.scheduled:
            seq = s.seq
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
                self.counters["prompt_tokens"] += len(seq.prompt_token_ids)
                self.counters["cached_prompt_tokens"] += seq.metrics.cached_prompt_tokens
            if seq.in_prefill:
                n = min(s.num_new_tokens, len(seq.prompt_token_ids) - seq.num_computed_tokens)
                seq.metrics.computed_prompt_tokens += n
                self.counters["computed_prompt_tokens"] += n
        sample_seqs, logits = self.runner.execute(so)
        for s in so.scheduled:
            if not s.seq.draft_token_ids:  # (a sequence with drafts advances by what it accepts)
                s.seq.num_computed_tokens += s.num_new_tokens
                self.kv.commit(s.seq)
        touched: dict[str, None] = {s.seq.request_id: None for s in so.scheduled}
        if sample_seqs:
            plain, rows, drafted, r = [], [], [], 0
            for seq in sample_seqs:
                if seq.draft_token_ids:
                    drafted.append((seq, r))
                    r += 1 + len(seq.draft_token_ids)
                else:
                    plain.append(seq)
                    rows.append(r)
                    r += 1
            if plain:
                tokens = self.sampler(plain, logits[rows] if drafted else logits)
                for seq, tok in zip(plain, tokens):
                    self._append_token(seq, tok)
            for seq, r in drafted:
                self._verify(seq, logits[r : r + 1 + len(seq.draft_token_ids)])
        self.counters["steps"] += 1
        return [self._output(rid) for rid in touched if rid in self.requests]

    def _propose_drafts(self) -> None:
        """Drafts for running sequences about to decode (engine/speculative.py), within the step's draft
        budget, those that accept most first; the scheduler may cut them."""
        decoding = []
        for seq in self.scheduler.running:
            seq.draft_token_ids = []
            if seq.num_computed_tokens == seq.num_tokens - 1:
                decoding.append(seq)
        budget = draft_budget(len(decoding))
        if budget <= 0:
            return
        # the step's expected tokens and cost (in weight passes) as drafts are added: each must raise its rate
        model = self.step_cost
        tokens, cost = float(len(decoding)), model.plain([s.num_tokens for s in decoding])
        for seq in sorted(decoding, key=lambda s: -(s.drafter.accept_rate if s.drafter is not None else 1.0)):
            if seq.params.seed is not None and seq.params.temperature > 0:
                continue  # (a seeded sampled request gets no drafts, so it reproduces whatever runs beside it)
            if seq.drafter is None:
                seq.drafter = NgramDrafter()
            limit = min(seq.params.max_tokens - len(seq.output_token_ids) - 1, self.max_model_len - seq.num_tokens,
                        budget, MAX_DRAFT)
            drafter: NgramDrafter = seq.drafter  # type: ignore[assignment]
            drafts = drafter.propose(seq, limit, self.shared_outputs, (tokens, cost, len(decoding)), self.draft_stats,
                                     model)
            g = seq.logits_processor
            if g is not None:  # structured output: what the grammar forces, else the drafts it allows
                forced = g.forced_tokens()[:limit] if limit > 0 else []
                if forced:
                    drafts, drafter.kind = forced, None  # (certain: not counted against n-gram drafts)
                else:
                    drafts = drafts[: g.valid_prefix(drafts)]
            seq.draft_token_ids = drafts
            if drafts:
                tokens += (len(drafts) if drafter.kind is None
                           else expected_accepted(len(drafts), self.draft_stats.rates(drafter.kind)))
                cost += len(drafts) * model.draft_row(seq.num_tokens, len(decoding))
            budget -= len(drafts)
            if budget <= 0:
                break

    def _verify(self, seq: Sequence, logits) -> None:
        """Emit the accepted drafts and one more token from the rows (1 + k, V) of seq's last token and its
        k drafts; only the accepted tokens count as computed, so rejected rows leave nothing behind."""
        drafts, seq.draft_token_ids = seq.draft_token_ids, []
        accepted = 0
        for i in range(len(drafts) + 1):
            draft = drafts[i] if i < len(drafts) else None
            tok = next_token(seq, logits[i], draft)
            self._push_token(seq, tok)
            if tok != draft or seq.finish_reason is not None:
                break
            accepted += 1
        seq.num_computed_tokens = seq.num_tokens - 1  # the last real token and the accepted drafts
        self.kv.commit(seq)
        seq.drafter.update(len(drafts), accepted, self.draft_stats)  # type: ignore[attr-defined]
        self.counters["draft_tokens"] += len(drafts)
        self.counters["accepted_draft_tokens"] += accepted
        if seq.finish_reason is not None:
            self._finish(seq)

    def _append_token(self, seq: Sequence, tok: int) -> None:
        self._push_token(seq, tok)
        if seq.finish_reason is not None:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        seq.metrics.finished_time = time.time()
        if self.shared_outputs is not None:
            self.shared_outputs.add(seq.output_token_ids)
        self.scheduler.finish(seq)

    def _push_token(self, seq: Sequence, tok: int) -> None:
        """Append one generated token; sets finish_reason when it stops the sequence."""
        p = seq.params
        seq.output_token_ids.append(tok)
        self.counters["generated_tokens"] += 1
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = time.time()
        if tok in p.stop_token_ids or (tok in self.eos_ids and not p.ignore_eos):
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, (tok if tok in p.stop_token_ids else None)
        else:
            delta = seq.detok.push(tok)
            if p.stop and delta:
                self._check_stop_strings(seq, len(delta))
        if seq.finish_reason is None and seq.logits_processor is not None and seq.logits_processor.is_terminated():
            seq.finish_reason = FinishReason.STOP
        if seq.finish_reason is None and (
            len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = FinishReason.LENGTH

    def _check_stop_strings(self, seq: Sequence, delta_len: int) -> None:
        text = seq.detok.text
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, len(text) - delta_len - longest + 1)
        hits = [(text.find(s, start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            seq.detok.text = text[: i + len(s)] if seq.params.include_stop_str_in_output else text[:i]
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, s

    def _visible_text(self, seq: Sequence) -> str:
        """Text safe to show now: while running, hold back a tail that could begin a stop string."""
        text = seq.detok.text
        if seq.finish_reason is not None or not seq.params.stop:
            return text
        hold = 0
        for s in seq.params.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold]

    def _output(self, rid: str) -> RequestOutput:
        req = self.requests[rid]
        outs = [
            CompletionOutput(s.index, self._visible_text(s), list(s.output_token_ids), s.finish_reason,
                             s.stop_reason, s.logprobs)
            for s in req.seqs
        ]
        finished = all(s.finish_reason is not None for s in req.seqs)
        m = req.seqs[0].metrics
        if finished:
            del self.requests[rid]
        return RequestOutput(rid, req.prompt, req.seqs[0].prompt_token_ids, outs, finished, m)

    # -- the KV hierarchy (sessions move their KV through kv / offload: sessions/kv.py) ----------
    def _on_preempt(self, seq: Sequence) -> None:
        """Recompute-preemption frees the blocks; for batch work with tiers, move them down first
        when the cost model says reloading beats recomputing."""
        if self.offload is None or seq.request_class != RequestClass.BATCH or not seq.block_keys:
            return
        n = len(seq.block_keys)
        d = self.placement.preempt_choice(self.pool.block_bytes * n, n * self.pool.block_size)
        if d.action != "drop":
            self.offload.offer_blocks(seq.block_table[:n])

    @property
    def cached_tokens_by_tier(self) -> dict[str, int]:
        """Tokens reused instead of computed, by the tier they came from, over every admission."""
        return self.scheduler.reused_tokens_by_tier

    def kv_stats(self) -> dict:
        out = {"device": {**self.pool.summary(), **self.pool.stats, "block_size": self.pool.block_size},
               "cached_tokens_by_tier": dict(self.cached_tokens_by_tier), "placement": self.placement.stats()}
        if self.offload is not None:
            out.update(self.offload.stats())
        return out

    def close(self, flush_device: bool = True) -> None:
        """Graceful stop: under write-on-evict, cached device blocks are written down first."""
        if self.offload is not None:
            if flush_device and not self.offload.stack.offer_on_compute:
                self.offload.flush_device()
            self.offload.close()
            self.offload = self.kv.offload = None

    # -- convenience ------------------------------------------------------------------------------
    def run_to_completion(self) -> dict[str, RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return done
