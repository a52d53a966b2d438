"""Batch invariance: a token's logits, and the K / V it leaves in the pool, do not depend on what else the
engine computes in the same step, on how its prompt was chunked, or on whether its prefix came from the
cache (docs/batch_invariance.md).

1. The native step, bit for bit, on small random models for every weight format (fp32, int8, int4) and
   KV dtype (fp32, fp16, bf16): a sequence decoded one token per call == the same tokens as one prefill
   call == prefilled in uneven chunks, each chunk sharing its call with other sequences' prefill and
   decode rows at different places in the step == with another thread count. Logits and pool contents
   are compared with torch.equal.
2. The engine on the default model, for each quantization the server runs (none, int8, int4), with
   hypothesis over random batch compositions and cache states: a request's greedy tokens alone == in a
   batch of other random prompts (added before it and while it decodes) == after a random-length prefix
   was cached on the device or parked in the host tier and restored == under a small token budget
   (chunked prefill).
"""

from __future__ import annotations

import pytest
import torch

from kvstrata import LLM, SamplingParams
from tests.conftest import make_tiny_checkpoint

native = pytest.importorskip("kvstrata.native")
if native.library() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip(f"native kernels unavailable: {native.native_status()['reason']}", allow_module_level=True)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    # realistic weight scale (see test_native.py); widths that int4's groups of 32 divide
    return make_tiny_checkpoint(tmp_path_factory.mktemp("bi-model"), initializer_range=0.05, hidden_size=256,
                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=320)


class _Seq:
    """A sequence's tokens and its own blocks in the pool (taken apart from the others')."""

    def __init__(self, eng, ids: list[int]) -> None:
        self.ids, self.bs = ids, eng.pool.block_size
        self.table = [eng.pool.allocate() for _ in range(-(-len(ids) // self.bs))][::-1]  # not adjacent

    def slot(self, p: int) -> int:
        return self.table[p // self.bs] * self.bs + p % self.bs


def _call(nat, rows: list[tuple[_Seq, int]], outs: list[int]) -> torch.Tensor:
    """One native step over rows (sequence, position); logits of the rows at indexes `outs`."""
    seqs: list[_Seq] = []
    for s, _ in rows:
        if s not in seqs:
            seqs.append(s)
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return nat.step(t([s.ids[p] for s, p in rows]), t([p for _, p in rows]), t([s.slot(p) for s, p in rows]),
                    t([seqs.index(s) for s, _ in rows]), [s.table for s in seqs], t(outs))


def _pool_rows(eng, seq: _Seq, n: int) -> list[torch.Tensor]:
    slots = torch.tensor([seq.slot(p) for p in range(n)])
    kvh, d = eng.pool.k.shape[-2], eng.pool.k.shape[-1]
    return [c[i].reshape(-1, kvh, d)[slots] for c in (eng.pool.k, eng.pool.v) for i in range(c.shape[0])]


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "bfloat16"])
def test_the_native_step_gives_a_row_the_same_bits_in_any_step(quantization, kv_dtype, small_model):
    llm = LLM(str(small_model), kv_device_bytes="32M", quantization=quantization, kv_dtype=kv_dtype, native_decode="on")
    eng, nat = llm.engine, llm.engine.runner.native
    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(3, eng.model_config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    n = 300  # three attention chunks of 128 and a partial one
    ids = rand(n)

    one = _Seq(eng, ids)  # a decode per call: the small-step path, chunks spread over the team
    decoded = torch.cat([_call(nat, [(one, p)], [0]) for p in range(n)])

    whole = _Seq(eng, ids)  # the whole prompt as one prefill: the many-rows path
    prefilled = _call(nat, [(whole, p) for p in range(n)], list(range(n)))
    assert torch.equal(prefilled, decoded)
    for a, b in zip(_pool_rows(eng, one, n), _pool_rows(eng, whole, n)):
        assert torch.equal(a, b)

    # uneven chunks, each sharing its step with other sequences: a prefill chunk before it, decodes after
    mixed, other, dec = _Seq(eng, ids), _Seq(eng, rand(260)), [_Seq(eng, rand(200)) for _ in range(3)]
    got, done_other = [], 0
    for k, (start, size) in enumerate([(0, 37), (37, 1), (38, 100), (138, 5), (143, 157)]):
        rows = [(other, p) for p in range(done_other, min(done_other + 40 + 13 * k, 260))]
        done_other += len(rows)
        first = len(rows)
        rows += [(mixed, p) for p in range(start, start + size)]
        rows += [(s, p) for s in dec for p in ([k] if k else range(4))]  # their first positions
        outs = list(range(first, first + size))
        got.append(_call(nat, rows, outs))
    assert torch.equal(torch.cat(got), decoded)
    for a, b in zip(_pool_rows(eng, one, n), _pool_rows(eng, mixed, n)):
        assert torch.equal(a, b)

    # small steps (at most 8 rows) of consecutive positions, as a decode row and its drafts are verified:
    # their K rows are read once for all of them (attn_multi), each row's bits those of its decode
    small, got, p, k = _Seq(eng, ids), [], 0, 0
    while p < n:
        size = min((5, 3, 8, 2, 7, 1, 6)[k % 7], n - p)
        got.append(_call(nat, [(small, q) for q in range(p, p + size)], list(range(size))))
        p, k = p + size, k + 1
    assert torch.equal(torch.cat(got), decoded)

    threads = torch.get_num_threads()  # another team size splits rows and columns differently
    try:
        torch.set_num_threads(2 if threads != 2 else 3)
        again = _Seq(eng, ids)
        assert torch.equal(_call(nat, [(again, p) for p in range(n)], list(range(n))), decoded)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not native.native_status().get("amx"), reason="no AMX tiles: not on this CPU, refused by the kernel, or KVSTRATA_AMX=0")
@pytest.mark.parametrize("shape", [dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=320),
                                   # inputs of 160 and 90: not whole tiles of 64, those products stay on VNNI
                                   dict(intermediate_size=90)])
def test_amx_tiles_give_the_bits_of_the_vnni_kernel(shape, tmp_path):
    """On a CPU with AMX (Intel since Sapphire Rapids) int8 products of 4 rows or more run on its tiles
    (gemm.c mm_i8_amx); their int32 sums are exact, so every row count, a whole 16-row tile and partial
    ones, gives the logits and pool contents of the VNNI kernel bit for bit (switched off in the same
    process)."""
    model = make_tiny_checkpoint(tmp_path / "m", initializer_range=0.05, **shape)
    llm = LLM(str(model), kv_device_bytes="32M", quantization="int8", native_decode="on")
    eng, nat, lib = llm.engine, llm.engine.runner.native, native.library()
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(3, eng.model_config.vocab_size, (150,), generator=g).tolist()
    try:
        runs = []
        for amx in (1, 0):
            assert lib.kv_amx(amx) == amx
            seq, got, p = _Seq(eng, ids), [], 0
            for size in (40, 16, 17, 4, 5, 3, 65):  # a prompt in chunks, then draft-sized steps
                got.append(_call(nat, [(seq, q) for q in range(p, p + size)], list(range(size))))
                p += size
            runs.append((torch.cat(got), _pool_rows(eng, seq, p)))
    finally:
        lib.kv_amx(1)
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_the_engine_runs_every_cpu_step_natively_and_batched_greedy_tokens_match_alone(small_model):
    """Through the engine: a prompt's greedy tokens alone == batched with others (prefill and decode
    rows mixed in its steps) == chunked under a 7-token budget; every step went to the native step."""
    llm = LLM(str(small_model), kv_device_bytes="32M", quantization="int8", enable_prefix_caching=False)
    eng = llm.engine
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, eng.model_config.vocab_size, (n,), generator=g).tolist() for n in (45, 9, 130, 70)]
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], sp)[0].outputs[0].token_ids for p in prompts]
    steps0 = eng.counters["steps"]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == alone
    eng.scheduler.budget = 7
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == alone
    assert eng.runner.native_steps == eng.counters["steps"] and eng.counters["steps"] > steps0


# -- 2. the engine on the default model, hypothesis over batches and cache states ----------------------

from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402

from kvstrata.config import EngineConfig  # noqa: E402
from kvstrata.engine.llm_engine import LLMEngine  # noqa: E402

# examples per quantization: fp32 and int4 compute in fp32 (a few seconds an example on one thread)
EXAMPLES = {"none": 5, "int8": 10, "int4": 6}
TARGET_TOKENS = 16


@pytest.fixture(scope="module")
def default_engines():
    """One load of the default model, three engines over it (each with a host tier to restore from)."""
    from kvstrata.loader import load_model

    lm = load_model("default", torch.float32)
    engines = {}
    for q in EXAMPLES:
        cfg = EngineConfig(model="default", quantization=q, kv_device_bytes="192M", kv_host_bytes="64M")
        engines[q] = LLMEngine(cfg, loaded=lm)
        assert engines[q].runner.native is not None
    return engines


def _run(eng: LLMEngine, jobs: list[tuple[int, list[int], int]], budget: int) -> list[list[int]]:
    """Greedy tokens of each job (arrival step, prompt, max_tokens), admitted at its arrival step."""
    eng.scheduler.budget = budget
    pending = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    rid_of: dict[str, int] = {}
    done: dict[int, list[int]] = {}
    step = 0
    try:
        while pending or eng.has_unfinished():
            while pending and jobs[pending[0]][0] <= step:
                i = pending.pop(0)
                rid_of[eng.add_request(jobs[i][1], SamplingParams(max_tokens=jobs[i][2], ignore_eos=True))] = i
            for out in eng.step():
                if out.finished:
                    done[rid_of[out.request_id]] = out.outputs[0].token_ids
            step += 1
    finally:
        eng.scheduler.budget = eng.config.max_num_batched_tokens
    return [done[i] for i in range(len(jobs))]


def _tokens(draw, lo: int, hi: int) -> list[int]:
    n = draw(st.integers(lo, hi))
    return draw(st.lists(st.integers(100, 49000), min_size=n, max_size=n))


@st.composite
def _scenario(draw):
    base = _tokens(draw, 4, 60)
    # part of the target may be an earlier request's own output: KV the cache got from decode steps
    follow = draw(st.integers(0, 24))
    tail = _tokens(draw, 1, 12) if follow else []
    others = [(draw(st.integers(0, 12)), _tokens(draw, 1, 80), draw(st.integers(1, 24)))
              for _ in range(draw(st.integers(1, 4)))]
    return dict(base=base, follow=follow, tail=tail, others=others, arrival=draw(st.integers(0, 6)),
                cached=draw(st.floats(0, 1)), tier=draw(st.sampled_from(["none", "device", "host"])),
                budget=draw(st.sampled_from([2048, 1, 7, 16, 33, 64])))


@pytest.mark.slow
@pytest.mark.parametrize("quantization", list(EXAMPLES))
def test_greedy_tokens_are_the_same_alone_batched_chunked_and_cached(quantization, default_engines):
    eng = default_engines[quantization]

    @settings(max_examples=EXAMPLES[quantization], deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(sc=_scenario())
    def check(sc):
        eng.pool.reset_prefix_cache()
        target = sc["base"]
        if sc["follow"]:  # the earlier request runs beside the others, its blocks stay cached
            out = _run(eng, [(0, sc["base"], sc["follow"])] + sc["others"][:1], 16)[0]
            target = sc["base"] + out + sc["tail"]
        eng.kv.enable_prefix_caching = False  # the reference: cold, alone, one prefill
        ref = _run(eng, [(0, target, TARGET_TOKENS)], 2048)[0]
        eng.kv.enable_prefix_caching = True
        prefix = target[: int(sc["cached"] * len(target))]
        if sc["tier"] != "none" and prefix:
            _run(eng, [(0, prefix, 1)] + sc["others"][1:2], sc["budget"])
            if sc["tier"] == "host":  # into the host tier and out of the device pool: restored on lookup
                eng.offload.park(prefix, "host", pin=False)
        hits = dict(eng.cached_tokens_by_tier)
        got = _run(eng, [(sc["arrival"], target, TARGET_TOKENS)] + sc["others"], sc["budget"])[0]
        assert got == ref, (quantization, len(target), len(prefix), sc["tier"], sc["budget"], len(sc["others"]))
        if sc["tier"] != "none" and len(prefix) >= eng.pool.block_size and len(target) > len(prefix):
            assert eng.cached_tokens_by_tier.get(sc["tier"], 0) > hits.get(sc["tier"], 0)  # the restore happened

    check()


def test_the_torch_int8_linear_quantizes_each_row_alone():
    """The torch path's int8 linear (no C compiler): a row's output is the same bits alone or beside rows
    of any magnitude. (PyTorch's dynamic linear alone picks one quantization grid from the whole matrix.)"""
    from kvstrata.model.quant import int8_linear

    g = torch.Generator().manual_seed(2)
    lin = int8_linear(torch.randn(96, 64, generator=g), torch.randn(96, generator=g))
    x = torch.randn(5, 64, generator=g)
    loud = torch.randn(3, 64, generator=g) * 1e3
    loud[:, 3] = -5e4  # a massive outlier (as at attention-sink positions)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(5)])
    assert torch.equal(lin(x), alone)
    assert torch.equal(lin(torch.cat([loud[:2], x, loud[2:]]))[2:7], alone)
