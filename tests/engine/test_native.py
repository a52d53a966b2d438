"""The native step (native/step.c, gemm.c, attn.c). Its batch invariance: test_batch_invariance.py.

1. Kernel arithmetic: teacher-forced native decoding (one token per call, from position 0, over blocks
   scattered through the pool) against a float64 emulation of the same int8 scheme written out here in
   torch: per-channel int8 weights times activations quantized per row to u8 over [min, max] (fbgemm's
   dynamic scheme), fp32 norms / RoPE / attention. Head sizes 16 (portable C loop), 64 and 128 (AVX-512
   loops where the CPU has them), GQA groups, Qwen2 biases, contexts across several attention chunks.
2. Batching: sequences of different lengths decoded in one call give bit-identical logits to each
   decoded alone.
3. The independent reference: on the default model, teacher-forced native decode logits against
   Hugging Face transformers in fp32 (KL and argmax agreement, the bounds of the torch int8 path);
   fp32 and int4 prefills against transformers are in test_reference.py; fp32 over fp16 / bf16 pools
   against the torch path, which rounds the pool the same way.
4. Engine wiring: auto / on / off, KVSTRATA_NATIVE=0, a compiler that fails, and what is refused.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from kvstrata import LLM, SamplingParams
from kvstrata.core import KvstrataError
from tests.conftest import make_tiny_checkpoint
from tests.engine.test_reference import _divergence_from_reference

native = pytest.importorskip("kvstrata.native")
if native.library() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip(f"native kernels unavailable: {native.native_status()['reason']}", allow_module_level=True)


def _q8(x: torch.Tensor) -> torch.Tensor:
    """Rows of x (float64) through u8 quantization over [min(x, 0), max(x, 0)] in 255 steps, dequantized."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    z = torch.round(-lo / s).clamp(0, 255)
    return ((torch.round(x / s) + z).clamp(0, 255) - z) * s


def _lin(mod, x: torch.Tensor) -> torch.Tensor:
    w8, scale = mod.int8_weight()
    w = w8.double() * scale.double()[:, None]
    y = _q8(x) @ w.T
    return y if mod.bias is None else y + mod.bias.double()


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _emulate(model, ids: list[int], pool_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
             computed: list | None = None) -> torch.Tensor:
    """Causal forward over `ids` in float64 with the native step's quantization -> logits (n, vocab).
    `pool_kv`: per layer, the (n, KVH, D) K and V the kernel stored in the pool, attended to instead of
    this function's own (a 16-bit pool rounds them, and where a value sits on a rounding boundary fp32 and
    float64 round it apart; reading the pool checks the kernel's attention exactly). `computed` collects
    this function's own per-layer (K, V) so the caller can check what the kernel stored."""
    cfg = model.cfg
    n, H, KVH, D, I = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    x = model.embed_tokens.weight.detach()[ids].double()
    cos = model.rotary.cos_table[:n].double()[:, None, :]
    sin = model.rotary.sin_table[:n].double()[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i, layer in enumerate(model.layers):
        qkv = _lin(layer.qkv_proj, _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps))
        qk = qkv[:, : (H + KVH) * D].view(n, H + KVH, D)
        qk = qk * cos + torch.cat((qk[..., D // 2 :], qk[..., : D // 2]), -1) * sin
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + KVH) * D :].view(n, KVH, D)
        if computed is not None:
            computed.append((k, v))
        if pool_kv is not None:
            k, v = pool_kv[i]
        k, v = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), -1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(n, H * D)
        x = x + _lin(layer.o_proj, o)
        gu = _lin(layer.gate_up_proj, _rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps))
        x = x + _lin(layer.down_proj, torch.nn.functional.silu(gu[:, :I]) * gu[:, I:])
    return _lin(model.lm_head_q, _rms(x, model.norm.weight, cfg.rms_norm_eps))


def _pool_kv(eng, table: list[int], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the K and V rows the pool holds for positions 0..n-1 of a sequence on `table`, float64."""
    bs, pool = eng.pool.block_size, eng.pool
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)])
    kvh, d = pool.k.shape[-2], pool.k.shape[-1]
    return [(pool.k[i].reshape(-1, kvh, d)[slots].double(), pool.v[i].reshape(-1, kvh, d)[slots].double())
            for i in range(pool.k.shape[0])]


def _check_against_emulation(eng, ids: list[int], table: list[int], ours: torch.Tensor) -> None:
    """Logits against the emulation attending to the pool's own K/V: median relative error < 1e-5 for
    fp32 and fp16 pools alike (see the test docstring for why not the max). The stored K/V against the
    emulation's own: median within one rounding step of the pool dtype, 99 % within 2 % (a u8 flip
    upstream moves a few)."""
    kv = _pool_kv(eng, table, len(ids))
    computed: list = []
    ref = _emulate(eng.model, ids, kv, computed)
    rel = (ours.double() - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert rel.median().item() < 1e-5 and rel.max().item() < 0.05, (rel.median().item(), rel.max().item())
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.97
    step = 2.0**-11 if eng.pool.k.dtype == torch.float16 else 2.0**-24  # half an ulp, relative
    for (k, v), (kc, vc) in zip(kv, computed):
        for stored, mine in ((k, kc), (v, vc)):
            r = ((stored - mine).abs() / mine.abs().clamp(min=1e-3)).flatten()
            # measured: median 4e-8-6e-8 (fp32) and 1.7e-4 (fp16), 99th percentile <= 6.6e-3 (flips)
            assert r.median().item() < 2 * step and r.quantile(0.99).item() < 2e-2, (r.median().item(), r.quantile(0.99).item())


def _scattered_blocks(eng, n_tokens: int) -> list[int]:
    """Blocks for n_tokens, taken from a pool where every other block is held by someone else and in
    reverse order, so no two neighbours in the table are adjacent in memory."""
    pool, bs = eng.pool, eng.pool.block_size
    need = -(-n_tokens // bs)
    got = [pool.allocate() for _ in range(2 * need)]
    mine = got[::2][::-1]
    for b in got[1::2]:
        pool.release(b)
    return mine


def _teacher_forced(eng, ids: list[int], table: list[int], nat=None) -> torch.Tensor:
    """Native logits at every position of ids, feeding ids one token per call."""
    bs, nat = eng.pool.block_size, nat or eng.runner.native
    rows = []
    for p, tok in enumerate(ids):
        rows.append(torch.from_numpy(nat.decode([tok], [p], [table[p // bs] * bs + p % bs], [table[: p // bs + 1]])))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Weights at a realistic scale (init std 0.05): the 0.3 of the other tests' models gives attention
    scores of 30-50 whose fp32 rounding flips activation u8 levels at most positions."""
    root = tmp_path_factory.mktemp("native-models")
    mk = lambda name, **kw: make_tiny_checkpoint(root / name, initializer_range=0.05, **kw)  # noqa: E731
    return {
        "d16-llama": mk("d16"),
        # an intermediate size that is not a multiple of 4: the down projection's inputs end in a partial
        # group of the VNNI panels (packed byte by byte)
        "d16-odd-k": mk("d16odd", intermediate_size=90),
        "d16-qwen2-bias": mk("q16", arch="qwen2"),
        "d64-gqa2": mk("d64", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=320),
        # more query heads per KV head than one pass over V holds in registers (4 at head_dim 64, 2 at
        # 128): the value loop's partial last group
        "d64-gqa6": mk("d64g6", hidden_size=384, num_attention_heads=6, num_key_value_heads=1, intermediate_size=320),
        "d128-gqa3": mk("d128", hidden_size=384, num_attention_heads=3, num_key_value_heads=1, intermediate_size=320),
        # a head_dim the vector kernels do not take whole: merging partials 64 outputs in registers, the rest
        # in the plain loop
        "d96-gqa2": mk("d96", hidden_size=384, num_attention_heads=4, num_key_value_heads=2, intermediate_size=320),
    }


@pytest.mark.parametrize("name,kv_dtype", [("d16-llama", "float32"), ("d16-qwen2-bias", "float32"), ("d16-odd-k", "float32"),
                                           ("d64-gqa2", "float32"),
                                           ("d128-gqa3", "float32"), ("d16-llama", "float16"), ("d64-gqa2", "float16"),
                                           ("d64-gqa6", "float16"), ("d128-gqa3", "float16"), ("d96-gqa2", "float16")])
def test_native_decode_matches_a_float64_emulation_of_its_arithmetic(name, kv_dtype, tiny_models):
    """Per position, max |ours - emulation| / max |emulation|. Where no activation lands on the other
    side of a u8 rounding boundary the two agree to fp32 accumulation error (~1e-7); one such flip (a
    step of 1/255 of a row's range, from an fp32-vs-float64 difference of ~1e-6) moves the logits by
    ~1e-2, and flips become likelier as the context grows. Measured over 300 positions: median 1e-7 to
    1.4e-6, max 0.010-0.020, argmax agreement 99.3-100%. Bounds: median < 1e-5 (an indexing, paging or
    merge bug shifts every position by far more), max < 0.05, agreement >= 97%."""
    llm = LLM(str(tiny_models[name]), kv_device_bytes="16M", quantization="int8", native_decode="on", kv_dtype=kv_dtype)
    eng = llm.engine
    n = 300  # three attention chunks of 128
    ids = torch.randint(3, eng.model_config.vocab_size, (n,), generator=torch.Generator().manual_seed(7)).tolist()
    table = _scattered_blocks(eng, n)
    _check_against_emulation(eng, ids, table, _teacher_forced(eng, ids, table))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 microarchitecture levels")
@pytest.mark.parametrize("march,kv_dtype", [("x86-64-v2", "float32"), ("x86-64-v3", "float32"), ("x86-64-v3", "float16")])
def test_the_portable_loops_match_the_emulation_too(march, kv_dtype, tiny_models):
    """The same check on builds for older CPUs (v2: SSE4.2 only; v3: AVX2, no AVX-512 or VNNI), so the
    plain C loops that such machines run are tested on every machine."""
    from kvstrata.native.decode import NativeDecoder

    lib = native.load(march=march)
    assert not lib.kv_has_vnni()
    llm = LLM(str(tiny_models["d64-gqa2"]), kv_device_bytes="16M", quantization="int8", native_decode="off",
              kv_dtype=kv_dtype)
    eng = llm.engine
    nat = NativeDecoder(eng.model, eng.pool, lib)
    n = 200
    ids = torch.randint(3, eng.model_config.vocab_size, (n,), generator=torch.Generator().manual_seed(5)).tolist()
    table = _scattered_blocks(eng, n)
    _check_against_emulation(eng, ids, table, _teacher_forced(eng, ids, table, nat))


def test_a_batch_gives_each_sequence_exactly_its_lone_result(tiny_models):
    llm = LLM(str(tiny_models["d64-gqa2"]), kv_device_bytes="16M", quantization="int8", native_decode="on")
    eng, bs, nat = llm.engine, llm.engine.pool.block_size, llm.engine.runner.native
    g = torch.Generator().manual_seed(3)
    lens = [1, 17, 130, 260]  # decode positions: within one chunk, one block, across chunks
    ids = [torch.randint(3, eng.model_config.vocab_size, (n,), generator=g).tolist() for n in lens]
    tables = [_scattered_blocks(eng, n) for n in lens]
    for i, t in zip(ids, tables):  # fill each context, token by token
        if len(i) > 1:
            _teacher_forced(eng, i[:-1], t)
    lone = [nat.decode([i[-1]], [n - 1], [t[(n - 1) // bs] * bs + (n - 1) % bs], [t]) for i, t, n in zip(ids, tables, lens)]
    batch = nat.decode([i[-1] for i in ids], [n - 1 for n in lens],
                       [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)], tables)
    assert np.array_equal(batch, np.concatenate(lone))


@pytest.mark.slow
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_native_decode_stays_close_to_transformers_on_the_default_model(kv_dtype, hf_default):
    """Teacher-forced native decode of the chat prompts against transformers' fp32 logits at every
    position. Measured: KL at the last position 0.015-0.064 nats, mean 0.025-0.056, argmax agreement
    81-83% with fp32 KV, 0.038-0.061 / 0.030-0.050 / 83-93% with fp16 KV (the torch int8 path's prefill, per-token activations: 0.36-0.65, 0.24-0.29, 72-89%, see
    test_reference.py). Bounds: KL < 0.5 at the last position, < 0.25 on average, agreement >= 70%."""
    llm = LLM("default", kv_device_bytes="256M", quantization="int8", native_decode="on", kv_dtype=kv_dtype)

    def native_logits(llm, ids):
        return _teacher_forced(llm.engine, ids, _scattered_blocks(llm.engine, len(ids)))

    for kl_last, kl_mean, agree in _divergence_from_reference(llm, hf_default, native_logits):
        assert kl_last < 0.5 and kl_mean < 0.25 and agree >= 0.7, (kl_last, kl_mean, agree)


def test_the_engine_decodes_through_the_native_step(tiny_llama):
    llm = LLM(str(tiny_llama), kv_device_bytes="16M", quantization="int8")
    assert llm.engine.runner.native is not None  # auto: int8 on CPU
    outs = llm.generate([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], SamplingParams(max_tokens=12, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12]
    assert llm.engine.runner.native_steps >= 10  # every all-decode step after the prefill


def test_quantization_auto_is_int8_on_cpu_in_float32_and_none_otherwise(tiny_llama):
    """`make serve` runs --quantization auto: the CPU fast path where it applies, the weights as loaded
    elsewhere; the engine's config and KV fingerprint name the mode it resolved to."""
    from kvstrata.engine.setup import auto_quantization

    auto = LLM(str(tiny_llama), kv_device_bytes="16M", quantization="auto").engine
    int8 = LLM(str(tiny_llama), kv_device_bytes="16M", quantization="int8").engine
    assert auto.config.quantization == "int8" and auto.runner.native is not None
    assert auto.fingerprint == int8.fingerprint  # the same KV bytes, so the same cache name
    bf16 = LLM(str(tiny_llama), kv_device_bytes="16M", quantization="auto", dtype="bfloat16").engine
    assert bf16.config.quantization == "none" and bf16.runner.native is None
    assert auto_quantization(torch.device("cuda"), torch.float32) == "none"
    with pytest.raises(KvstrataError, match="quantization must be none, int8, int4 or auto"):
        LLM(str(tiny_llama), kv_device_bytes="16M", quantization="int2")


def test_a_failing_native_step_falls_back_to_torch_and_loses_nothing(tiny_llama, monkeypatch, caplog):
    """Every error the C step returns comes before it writes anything (out of memory, a position outside
    the RoPE table), so the runner can redo that step on the torch path and keep going without it: the
    request then gets exactly what the torch path alone gives."""
    torch_only = LLM(str(tiny_llama), kv_device_bytes="16M", quantization="int8", native_decode="off")
    ref = torch_only.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids
    llm = LLM(str(tiny_llama), kv_device_bytes="16M", quantization="int8")
    runner = llm.engine.runner

    def broken(*a, **k):
        raise KvstrataError("the native step ran out of memory")

    monkeypatch.setattr(runner.native, "step", broken)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids
    assert runner.native is None and "continuing on the torch path" in caplog.text
    assert out == ref


def test_off_and_not_applicable(tiny_llama):
    assert LLM(str(tiny_llama), kv_device_bytes="16M", quantization="int8", native_decode="off").engine.runner.native is None
    for q in ("none", "int8", "int4"):  # auto: every CPU float32 engine, whatever its weights
        eng = LLM(str(tiny_llama), kv_device_bytes="16M", quantization=q).engine
        assert eng.runner.native is not None and eng.runner.native.formats == [{"none": "fp32"}.get(q, q)]
    assert LLM(str(tiny_llama), kv_device_bytes="16M", kv_dtype="bfloat16", native_decode="on").engine.runner.native
    assert LLM(str(tiny_llama), kv_device_bytes="16M", dtype="bfloat16").engine.runner.native is None  # bf16 compute
    with pytest.raises(KvstrataError, match="CPU model computing in float32"):
        LLM(str(tiny_llama), kv_device_bytes="16M", dtype="bfloat16", native_decode="on")
    with pytest.raises(KvstrataError, match="native_decode must be"):
        LLM(str(tiny_llama), kv_device_bytes="16M", native_decode="yes")
    with pytest.raises(KvstrataError, match="kv_dtype must be"):
        LLM(str(tiny_llama), kv_device_bytes="16M", kv_dtype="int4")


def test_a_compiler_that_fails_falls_back_or_errors(tiny_llama, monkeypatch, tmp_path, caplog):
    """A broken toolchain: `auto` keeps the torch path and logs why; `on` refuses to start."""
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path / "native")  # nothing cached there
    monkeypatch.setenv("CC", "false")
    native.library.cache_clear()
    try:
        llm = LLM(str(tiny_llama), kv_device_bytes="16M", quantization="int8")
        assert llm.engine.runner.native is None
        assert "failed to build" in native.native_status()["reason"]
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 4
        with pytest.raises(KvstrataError, match="native-decode on"):
            LLM(str(tiny_llama), kv_device_bytes="16M", quantization="int8", native_decode="on")
        monkeypatch.delenv("CC")
        monkeypatch.setenv("KVSTRATA_NATIVE", "0")
        native.library.cache_clear()
        assert native.library() is None and "KVSTRATA_NATIVE=0" in native.native_status()["reason"]
    finally:
        native.library.cache_clear()


def test_a_damaged_cached_build_is_rebuilt(tmp_path, monkeypatch):
    """A truncated library in the cache (a crash mid-write by an older version, a full disk) must not
    stop the engine: the loader notices it does not load and builds it again."""
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path / "native")
    path = native.build()
    path.write_bytes(path.read_bytes()[:100])
    native.library.cache_clear()
    try:
        assert native.library() is not None
        assert path.stat().st_size > 1000
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_fp32_over_a_16_bit_pool_matches_the_torch_path(kv_dtype, tiny_models):
    """fp32 weights over an fp16 / bf16 pool: the native prefill's logits against the torch model's on the
    same engine (both store K / V rounded the same way, then compute in fp32): within 1e-3 of the logit
    scale, the same argmax at >= 97 % of positions (a rounding boundary can fall differently)."""
    from tests.engine.test_reference import _our_prefill_logits
    from kvstrata.model.attention import AttnMetadata, PrefillSpan

    llm = LLM(str(tiny_models["d64-gqa2"]), kv_device_bytes="16M", kv_dtype=kv_dtype, quantization="none")
    eng = llm.engine
    ids = torch.randint(3, eng.model_config.vocab_size, (200,), generator=torch.Generator().manual_seed(9)).tolist()
    ours = _our_prefill_logits(llm, ids)  # the native step
    blocks = _scattered_blocks(eng, len(ids))
    table, pos, bs = torch.tensor(blocks), torch.arange(len(ids)), eng.pool.block_size
    meta = AttnMetadata(slot_mapping=table[pos // bs] * bs + pos % bs, prefills=[PrefillSpan(0, len(ids), 0, table)])
    ref = eng.model(torch.tensor(ids), pos, eng.pool.k_layers, eng.pool.v_layers, meta, pos)
    assert (ours - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.97
