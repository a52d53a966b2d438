"""Start-up and memory: the fast GGUF reader against the gguf package's, the caches derived from a model
file (converted tokenizer, int8 layout) rebuilt whenever the file changes or the cache is damaged, the
KV pool committing memory only as blocks are used (and the native step unaffected), the defaults every
entry point shares, and `kvstrata generate`'s memory on the default model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstrata import LLM, SamplingParams
from kvstrata.cli.main import COMMANDS, main
from kvstrata.core import KvstrataError
from kvstrata.loader import load_model
from kvstrata.loader.gguf_reader import GGUFStrings, read_gguf
from kvstrata.model.quant import PerTokenInt8Linear
from tests.engine.gguf_writer import write_gguf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("startup-gguf")
    out = {}
    for qtype in ("F32", "Q8_0"):
        out[qtype] = d / f"tiny-{qtype}.gguf"
        write_gguf(tiny_llama, out[qtype], qtype)
    return out


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (GGUFStrings, list)):
        return [_plain(x) for x in v]
    return v


def _same_as_the_gguf_package(path: Path) -> None:
    import gguf

    ref = gguf.GGUFReader(str(path))
    ours = read_gguf(str(path))
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(ours.metadata)
    for k, v in fields.items():
        assert _plain(ours.metadata[k]) == v, k
    assert len(ref.tensors) == len(ours.tensors)
    for a, b in zip(ref.tensors, ours.tensors):
        assert (a.name, [int(x) for x in a.shape], a.tensor_type.name, a.data_offset, a.n_bytes) == \
               (b.name, list(b.shape), b.type_name, b.offset, b.nbytes)
        arr = ours.tensor_array(b)
        assert arr.dtype == a.data.dtype and arr.shape == a.data.shape and np.array_equal(arr, a.data), a.name


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_the_fast_reader_gives_the_gguf_packages_fields_on_written_files(qtype, tiny_ggufs):
    _same_as_the_gguf_package(tiny_ggufs[qtype])


def test_the_fast_reader_gives_the_gguf_packages_fields_on_the_default_model(default_gguf):
    _same_as_the_gguf_package(Path(default_gguf))


def test_the_fast_reader_reads_every_value_type(tmp_path):
    import gguf

    p = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_uint8("t.u8", 200); w.add_int8("t.i8", -100); w.add_uint16("t.u16", 60000); w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000); w.add_int32("t.i32", -2_000_000_000); w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63 + 5); w.add_int64("t.i64", -(2**62)); w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True); w.add_string("t.str", "Grüße 東京 🚀"); w.add_string("t.empty", "")
    w.add_array("t.ints", [1, 2, 3]); w.add_array("t.floats", [0.5, -1.0]); w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.bools", [True, False]); w.add_array("t.none", [])
    w.add_tensor("x.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("y.weight", np.arange(6, dtype=np.float16).reshape(2, 3))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _same_as_the_gguf_package(p)


def test_the_fast_reader_refuses_damaged_files(tiny_ggufs, tmp_path):
    data = tiny_ggufs["Q8_0"].read_bytes()
    g = read_gguf(str(tiny_ggufs["Q8_0"]))
    cases = {"in-vocab.gguf": data[: g.metadata_span[1] // 2], "no-tensor-data.gguf": data[: g.data_start + 10],
             "magic.gguf": b"GGUX" + data[4:], "version.gguf": data[:4] + b"\x07\x00\x00\x00" + data[8:]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(KvstrataError, match="truncated|corrupt|version"):
            read_gguf(str(tmp_path / name))


def _rewrite(src: Path, dst: Path, template: str, tokenizer_model: str | None = None) -> None:
    """A copy of a GGUF file with another chat template (the vocabulary and tensors unchanged), and
    another tokenizer model where given."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in ("general.architecture", "tokenizer.chat_template"):
            continue
        if k == "tokenizer.ggml.model" and tokenizer_model is not None:
            w.add_string(k, tokenizer_model)
            continue
        v, vtype = f.contents(), f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(k, v)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(k, v)
        else:
            w.add_key_value(k, v, vtype)
    w.add_string("tokenizer.chat_template", template)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture
def private_home(tmp_path, monkeypatch) -> Path:
    """A KVSTRATA_HOME of this test alone (no cache shared with other tests)."""
    home = tmp_path / "private-home"
    monkeypatch.setenv("KVSTRATA_HOME", str(home))
    return home


def test_the_tokenizer_cache_is_keyed_by_the_metadata_and_a_damaged_entry_is_rebuilt(tiny_ggufs, tmp_path,
                                                                                     private_home, monkeypatch):
    from kvstrata.tokenizer import gguf_tokenizer

    conversions = []
    real = gguf_tokenizer._convert
    monkeypatch.setattr(gguf_tokenizer, "_convert", lambda path: conversions.append(path) or real(path))
    src = tmp_path / "m.gguf"
    shutil.copy(tiny_ggufs["Q8_0"], src)
    first = load_model(str(src)).tokenizer
    again = load_model(str(src)).tokenizer
    assert len(conversions) == 1 and again.encode("The quick brown fox") == first.encode("The quick brown fox")
    os.utime(src, ns=(0, 10**9))  # touched: same metadata bytes, so the same tokenizer
    load_model(str(src))
    assert len(conversions) == 1
    other = tmp_path / "other.gguf"
    _rewrite(src, other, "{{ 'changed' }}")
    changed = load_model(str(other)).tokenizer
    assert len(conversions) == 2 and changed.chat_template == "{{ 'changed' }}"
    for f in (private_home / "tokenizers").glob("*.json"):
        f.write_text("{ not json")
    rebuilt = load_model(str(src)).tokenizer
    assert len(conversions) == 3 and rebuilt.encode("The quick brown fox") == first.encode("The quick brown fox")
    # the conversion runs in a child interpreter (transformers stays out of the engine's process): what
    # stops it is this process's clear error, and nothing is cached
    bad = tmp_path / "bad.gguf"
    _rewrite(src, bad, "{{ 'x' }}", tokenizer_model="no-such-model")
    with pytest.raises(KvstrataError, match=r"building the tokenizer of .*bad.gguf failed: \w+"):
        load_model(str(bad)).tokenizer
    assert len(list((private_home / "tokenizers").glob("*.json"))) == 4  # (two entries of two files: none for the bad one)


def _prefill_logits(llm: LLM) -> torch.Tensor:
    from tests.engine.test_reference import _our_prefill_logits

    return _our_prefill_logits(llm, llm.tokenizer.encode("The quick brown fox jumps over the lazy dog"))


def _torch_path_logits(llm: LLM) -> torch.Tensor:
    native, llm.engine.runner.native = llm.engine.runner.native, None
    try:
        return _prefill_logits(llm)
    finally:
        llm.engine.runner.native = native


def test_the_int8_layout_cache_is_used_and_rebuilt_when_the_file_changes(tiny_ggufs, tiny_llama, tmp_path,
                                                                         private_home, monkeypatch):
    from kvstrata.engine import setup

    builds = []
    real = setup.int8_model_streamed
    monkeypatch.setattr(setup, "int8_model_streamed", lambda lm: builds.append("int8") or real(lm))
    src = tmp_path / "m.gguf"
    shutil.copy(tiny_ggufs["Q8_0"], src)

    def engine():
        return LLM(str(src), kv_device_bytes="4M")  # the defaults: int8 on CPU, from the layout when cached

    fresh = engine()
    assert builds == ["int8"] and fresh.engine.config.quantization == "int8"
    layouts = list((private_home / "layouts").glob("*.kvt"))
    assert len(layouts) == 1
    cached = engine()
    assert builds == ["int8"]  # nothing quantized: the layout was mapped
    assert torch.equal(_prefill_logits(cached), _prefill_logits(fresh))
    # fbgemm's copy for the torch path is packed on first use, from the map whose pages were dropped
    int8 = [m for m in cached.engine.model.modules() if isinstance(m, PerTokenInt8Linear)]
    assert int8 and all(m.dyn is None and m.mapped for m in int8)
    assert torch.equal(_torch_path_logits(cached), _torch_path_logits(fresh))
    assert all(m.dyn is not None for m in int8)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert cached.generate([[5, 6, 7]], params)[0].outputs[0].token_ids == fresh.generate([[5, 6, 7]], params)[0].outputs[0].token_ids

    os.utime(src, ns=(0, 10**9))  # touched: the file's identity changed, so the layout is rebuilt
    engine()
    assert builds == ["int8"] * 2
    write_gguf(tiny_llama, src, "F32")  # other weights under the same path
    changed = engine()
    assert builds == ["int8"] * 3 and list((private_home / "layouts").glob("*.kvt")) == layouts  # overwritten
    monkeypatch.setenv("KVSTRATA_LAYOUT_CACHE", "0")
    assert torch.equal(_prefill_logits(changed), _prefill_logits(engine()))
    monkeypatch.delenv("KVSTRATA_LAYOUT_CACHE")
    assert builds == ["int8"] * 4

    data = bytearray(layouts[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: the checksum catches it
    layouts[0].write_bytes(bytes(data))
    repaired = engine()
    assert builds == ["int8"] * 5 and torch.equal(_prefill_logits(repaired), _prefill_logits(changed))
    layouts[0].write_bytes(layouts[0].read_bytes()[:-100])  # truncated
    engine()
    assert builds == ["int8"] * 6
    engine()
    assert builds == ["int8"] * 6  # and trusted again once rewritten


def test_the_int8_model_built_layer_by_layer_is_the_one_built_whole(tiny_ggufs, tiny_llama):
    """A first start builds the int8 model as the file's tensors are read, quantizing each layer once its
    last tensor arrives (the float copies of one layer alive at a time): its parameters and int8 weights
    are those of the float model built whole and then quantized, bit for bit; a weight the model has no
    place for, or one missing, is a clear error."""
    from kvstrata.engine.layout import int8_model_streamed, model_from_weights
    from kvstrata.engine.setup import apply_quantization

    cpu = torch.device("cpu")
    for lm in (load_model(str(tiny_ggufs["Q8_0"]), "float32"), load_model(str(tiny_llama), "float32")):
        streamed = int8_model_streamed(lm)
        whole = apply_quantization(model_from_weights(lm, torch.float32, cpu), "int8", cpu, torch.float32)
        a, b = dict(streamed.named_parameters()), dict(whole.named_parameters())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        qa = {n: m.int8 for n, m in streamed.named_modules() if isinstance(m, PerTokenInt8Linear)}
        qb = {n: m.int8 for n, m in whole.named_modules() if isinstance(m, PerTokenInt8Linear)}
        assert qa.keys() == qb.keys() and len(qa) == 4 * len(whole.layers) + 1
        assert all(torch.equal(x, y) for k in qa for x, y in zip(qa[k], qb[k]))
    weights = dict(lm.iter_weights())
    lm._weights = lambda: (kv for kv in weights.items() if kv[0] != "layers.1.down_proj.weight")
    with pytest.raises(KvstrataError, match="missing.*layers.1.down_proj.weight"):
        int8_model_streamed(lm)
    lm._weights = lambda: iter({**weights, "layers.0.extra.weight": torch.zeros(2)}.items())
    with pytest.raises(KvstrataError, match="layers.0.extra.weight.* has no place"):
        int8_model_streamed(lm)


def test_an_hf_checkpoint_is_read_a_tensor_at_a_time_under_the_identity_it_always_had(tiny_llama, tmp_path):
    """Opening an HF checkpoint reads a few rows of each tensor for its identity, the rest as the model is
    built; the identity is the hash of the whole tensors' first and last 64 values that earlier versions
    computed (KV blocks cached under it keep their keys), here recomputed from the file read whole."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    d = tmp_path / "hf"
    shutil.copytree(tiny_llama, d)
    full = load_file(str(d / "model.safetensors"))
    full["model.norm.weight"] = full["model.norm.weight"].to(torch.bfloat16)  # another dtype, a 1-D tensor
    full["model.extra_scalar"] = torch.tensor(3.0)  # a 0-d tensor (named: not the model's, still hashed)
    save_file(full, str(d / "model.safetensors"))
    h = hashlib.sha256(b"hf")
    h.update((d / "config.json").read_bytes())
    h.update(f"model.safetensors:{os.path.getsize(d / 'model.safetensors')}".encode())
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if "rotary_emb" in key:
                continue
            t = f.get_tensor(key)  # (whole)
            h.update(f"{key}:{list(t.shape)}:{t.dtype}".encode())
            flat = t.reshape(-1)
            h.update(flat[:64].float().numpy().tobytes() + flat[-64:].float().numpy().tobytes())
    lm = load_model(str(d), "float32")
    assert lm.source_id == h.hexdigest()
    got = dict(lm.iter_weights())
    assert got["embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(got["embed_tokens.weight"], full["model.embed_tokens.weight"].float())
    assert torch.equal(got["norm.weight"], full["model.norm.weight"].float())


def test_an_hf_checkpoint_gets_the_layout_cache_and_a_changed_shard_rebuilds_it(tiny_llama, tmp_path, private_home,
                                                                                  monkeypatch):
    from safetensors.torch import load_file, save_file

    from kvstrata.engine import setup

    builds = []
    real = setup.int8_model_streamed
    monkeypatch.setattr(setup, "int8_model_streamed", lambda lm: builds.append(lm.path) or real(lm))
    d = tmp_path / "hf"
    shutil.copytree(tiny_llama, d)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    built = LLM(str(d), kv_device_bytes="4M").generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    assert len(builds) == 1 and len(list((private_home / "layouts").glob("*.kvt"))) == 1
    cached = LLM(str(d), kv_device_bytes="4M")
    assert len(builds) == 1 and cached.generate([[5, 6, 7]], params)[0].outputs[0].token_ids == built
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 2
    save_file(sd, str(d / "model.safetensors"))  # other weights in the same shard: rebuilt, not trusted
    LLM(str(d), kv_device_bytes="4M")
    assert len(builds) == 2


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status")


def test_a_tensor_file_is_checked_without_making_its_map_resident_and_old_crc_files_still_load(tmp_path):
    """Every byte is checked (XXH3 now; files that name no checksum carry CRC-32s and are checked with
    them), by reading, so loading leaves the map's pages untouched: the caller makes resident only what
    it reads."""
    import json
    import struct
    import zlib

    from kvstrata.loader import tensor_file as tf

    tensors = {"w": torch.randn(4096, 4096), "b": torch.arange(7, dtype=torch.int8)}  # 64 MiB
    path = tmp_path / "t.kvt"
    assert tf.save_tensors(path, "id", tensors)
    # numpy arrays and bfloat16 tensors too; numpy reads bfloat16 back as its bit patterns
    mixed = {"h": np.arange(6, dtype=np.float16).reshape(2, 3), "bf": torch.linspace(-2, 2, 9).to(torch.bfloat16),
             "empty": torch.zeros(0, 4)}
    assert tf.save_tensors(tmp_path / "m.kvt", "id", mixed)
    arrays = tf.load_arrays(tmp_path / "m.kvt", "id")
    assert arrays is not None and {k: d for k, (_, d) in arrays.items()} == {"h": "float16", "bf": "bfloat16",
                                                                            "empty": "float32"}
    assert np.array_equal(arrays["h"][0], mixed["h"]) and arrays["bf"][0].dtype == np.uint16
    back = tf.load_tensors(tmp_path / "m.kvt", "id")
    assert torch.equal(back["bf"], mixed["bf"]) and back["empty"].shape == (0, 4)
    assert torch.equal(back["h"], torch.from_numpy(mixed["h"]))
    assert json.loads(path.read_bytes()[16:16 + struct.unpack("<Q", path.read_bytes()[8:16])[0]])["checksum"] == "xxh3_64"
    before = _rss_file_kib()
    got = tf.load_tensors(path, "id")
    assert _rss_file_kib() - before < 8 << 10  # (64 MiB checked; under 8 MiB of it mapped in)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)

    # a file as the first version wrote it: no checksum named, CRC-32 per tensor
    entries, blobs, off = [], [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        off = -(-off // 64) * 64
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), off, len(raw), zlib.crc32(raw)])
        blobs.append((off, raw))
        off += len(raw)
    header = json.dumps({"identity": "id", "data_bytes": off, "tensors": entries}).encode()
    start = -(-(16 + len(header)) // 64) * 64
    data = bytearray(start + off)
    data[:16 + len(header)] = tf.MAGIC + struct.pack("<Q", len(header)) + header
    for o, raw in blobs:
        data[start + o:start + o + len(raw)] = raw
    old = tmp_path / "old.kvt"
    old.write_bytes(bytes(data))
    got = tf.load_tensors(old, "id")
    assert got is not None and all(torch.equal(got[k], tensors[k]) for k in tensors)
    data[start + 12345] ^= 1
    old.write_bytes(bytes(data))
    assert tf.load_tensors(old, "id") is None
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # the last tensor's bytes, in an XXH3 file
    path.write_bytes(bytes(data))
    assert tf.load_tensors(path, "id") is None


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status")


def test_the_kv_pool_commits_memory_only_as_blocks_are_used():
    from kvstrata.kv.pool import BlockPool

    per_block = BlockPool.bytes_per_block(16, 4, 2, 64, torch.float16)
    before = _rss_anon_kib()
    pool = BlockPool((2 << 30) // per_block, 16, 4, 2, 64, torch.float16)  # 2 GiB reserved
    assert (_rss_anon_kib() - before) < 32 << 10  # (interpreter noise only: nothing was zero-filled)
    assert pool.num_free == pool.num_blocks and pool.num_touched == 0
    got = [pool.allocate() for _ in range(4)]
    assert got == [0, 1, 2, 3] and pool.num_touched == 4
    for b in got:
        pool.k[:, b] = b + 1
    pool.release(1)
    pool.release(3)
    assert pool.allocate() == 1 and pool.allocate() == 3  # released blocks before fresh ones
    assert pool.allocate() == 4
    pool.register(0, b"key0", list(range(16)))
    pool.release(0)  # cached, not free
    many = [pool.allocate() for _ in range(pool._huge_at + 10)]  # past the point huge pages are advised
    assert 0 not in many and many == list(range(5, 5 + len(many)))
    assert [int(pool.k[0, b, 0, 0, 0]) for b in (1, 2, 3)] == [2, 3, 4]  # contents kept
    assert float(pool.k[:, many[-1]].abs().sum()) == 0.0  # fresh memory reads as zeros
    pool.check_invariants()
    assert pool.summary() == {"total": pool.num_blocks, "free": pool.num_blocks - len(many) - 5, "cached": 1,
                              "in_use": len(many) + 4}


def test_eviction_waits_until_every_block_has_been_used():
    from kvstrata.kv.pool import BlockPool

    pool = BlockPool(3, 16, 1, 1, 8)
    a = pool.allocate()
    pool.register(a, b"a", [1] * 16)
    pool.release(a)
    assert [pool.allocate(), pool.allocate()] == [1, 2] and pool.stats["evictions"] == 0
    assert pool.allocate() == a and pool.stats["evictions"] == 1  # the cap reached: now the LRU goes
    with pytest.raises(MemoryError):
        pool.allocate()


def test_the_native_step_reads_blocks_committed_late_exactly_as_early_ones(tiny_llama):
    """The pool's tensors never move as it commits memory, so the native step's pointers stay right: the
    same sequence decoded on the first blocks and on blocks committed after huge-page advice gives
    bit-identical logits."""
    from tests.engine.test_native import _teacher_forced

    llm = LLM(str(tiny_llama), kv_device_bytes="64M", quantization="int8", native_decode="on")
    eng, bs = llm.engine, llm.engine.pool.block_size
    ids = torch.randint(3, eng.model_config.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    need = -(-len(ids) // bs)
    early = [eng.pool.allocate() for _ in range(need)]
    a = _teacher_forced(eng, ids, early)
    filler = [eng.pool.allocate() for _ in range(eng.pool._huge_at + 3)]
    late = [eng.pool.allocate() for _ in range(need)]
    assert min(late) > max(filler) > max(early)
    b = _teacher_forced(eng, ids, late)
    assert torch.equal(a, b)


def _mapped(addr: int) -> bool:
    """Whether addr lies in one of this process's mappings (/proc/self/maps)."""
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the arena is backed ahead on Linux only")
def test_a_weight_arena_backed_ahead_is_used_when_large_enough_and_never_leaked(tiny_llama, private_home):
    """The size an engine's native step needed is remembered per settings; the next start backs a map of
    that size early and the native step builds its arena in it (same tokens as an arena of its own). A map
    too small is unmapped and replaced; one nobody takes is unmapped; a damaged hints file is only a miss."""
    from kvstrata import startup

    settings = dict(kv_device_bytes="4M", quantization="int8", native_decode="on")
    key = startup.arena_key(str(tiny_llama), "int8", "auto", "auto")
    assert not startup.prefault_arena(key)  # nothing remembered yet: nothing backed
    prompt = list(range(5, 40))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = LLM(str(tiny_llama), **settings)
    want = plain.generate([prompt], params)[0].outputs[0].token_ids
    need = plain.engine.runner.native.weight_bytes
    assert not plain.engine.runner.native.arena_mapped and need > 0
    del plain

    assert startup.prefault_arena(key)
    ahead = LLM(str(tiny_llama), **settings)
    assert ahead.engine.runner.native.arena_mapped
    assert ahead.generate([prompt], params)[0].outputs[0].token_ids == want
    del ahead

    startup.remember_arena(key, 64 << 10)  # (as if the model had shrunk since)
    assert startup.prefault_arena(key)
    base = startup._arena["thread"].join() or startup._arena["map"][0]
    small = LLM(str(tiny_llama), **settings)
    assert not small.engine.runner.native.arena_mapped and not _mapped(base)
    assert small.generate([prompt], params)[0].outputs[0].token_ids == want
    del small

    assert startup.prefault_arena(key)  # nobody takes it
    startup._arena["thread"].join()
    base = startup._arena["map"][0]
    assert _mapped(base)
    startup.discard_arena()
    assert not _mapped(base) and startup.take_arena() == (0, 0, 0.0)

    (private_home / "native" / "arena-hints.json").write_text("{not json")
    assert not startup.prefault_arena(key)
    startup.remember_arena(key, need)
    assert startup.prefault_arena(key)
    startup.discard_arena()


def test_only_commands_that_build_an_engine_here_get_an_arena_backed_early():
    from kvstrata.cli.main import build_parser, builds_engine

    def parsed(*argv):
        return build_parser(list(argv)).parse_args(list(argv))

    assert builds_engine(parsed("generate", "hi")) and builds_engine(parsed("chat"))
    assert builds_engine(parsed("serve")) and builds_engine(parsed("jobs", "run", "tasks.jsonl"))
    assert not builds_engine(parsed("serve", "--replicas", "2"))  # (the replicas build theirs, elsewhere)
    assert not builds_engine(parsed("jobs", "status")) and not builds_engine(parsed("plan"))


def test_every_entry_point_shares_the_fast_path_default(tiny_llama):
    from kvstrata.cli.main import build_parser
    from kvstrata.config import EngineConfig, engine_config_from_args

    assert (EngineConfig().quantization, EngineConfig().kv_dtype) == ("auto", "auto")
    for argv in (["generate", "hi"], ["chat"], ["serve"], ["jobs", "run", "tasks.jsonl"]):
        args = build_parser(argv).parse_args(argv)
        assert engine_config_from_args(args).quantization == "auto", argv
    eng = LLM(str(tiny_llama), kv_device_bytes="4M").engine
    assert eng.config.quantization == "int8" and eng.kv_dtype == torch.float16 and eng.runner.native is not None
    exact = LLM(str(tiny_llama), kv_device_bytes="4M", quantization="none").engine
    assert exact.kv_dtype == torch.float32 and exact.runner.native.formats == ["fp32"]  # fp32 weights and KV


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    # argparse formats help strings with %: a help text that says "8 % fewer" crashed `serve --help`
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kvstrata {command}") and "--help" in out
    if command in ("serve", "generate", "chat"):
        assert "--speculative-shared" in out and "8 % fewer" in out  # engine flags, "%" printed as written


def test_the_tokenizer_does_not_import_the_loader():
    code = ("import sys, kvstrata.tokenizer.gguf_tokenizer, kvstrata.tokenizer.tokenizer; "
            "assert not [m for m in sys.modules if m.startswith('kvstrata.loader')], sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


@pytest.mark.slow
def test_generate_on_the_default_model_stays_under_a_gib_cold_and_half_a_gib_warm_and_imports_nothing_it_does_not_use(tmp_path):
    """`kvstrata generate` with no flags, twice in a home of its own. The first start finds no caches: it
    converts the tokenizer and builds the int8 layout (layer by layer: engine/layout.py) in torch; its peak
    RSS stays under 1 GiB, measured 0.70-0.9 GiB (1.36 GiB when the whole float model was built first).
    The second finds them warm: under 512 MiB, measured 338 MiB (the native step's int8 weights 0.13 GiB,
    the interpreter with numpy and tokenizers, the layout's pages while it is read), and torch is never
    imported (0.85-0.9 GiB when it was). Peak RSS: the kernel's high-water mark of the process's own
    memory (VmHWM, read by the process as it exits); not wait4's ru_maxrss: a child started with vfork +
    exec is charged its parent's high-water mark, here the test process's own. The compiled kernels are
    shared with the session (a compiler is a process of its own: its memory is never the engine's). Start
    phases and the first token's time are logged at debug level."""
    from kvstrata.core import kvstrata_home

    home = tmp_path / "cold-home"
    home.mkdir()
    (home / "native").symlink_to(kvstrata_home() / "native", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "KVSTRATA_HOME": str(home)}
    probe = ("import sys, runpy; sys.argv = ['kvstrata', '--log-level', 'debug', 'generate', "
             "'The capital of France is', '--max-tokens', '16']; from kvstrata.cli.main import main; rc = main(); "
             "heavy = [m for m in ('transformers', 'jinja2', 'llguidance', 'matplotlib', 'redis', 'psycopg', "
             "'fastapi', 'uvicorn', 'sympy', 'gguf', 'torch') if m in sys.modules]; print('HEAVY', heavy); "
             "import gc; print('GC', gc.isenabled(), gc.get_freeze_count() > 0); "
             "print('HWM', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))); "
             "sys.exit(rc)")
    peaks = []
    for run in range(2):
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Paris" in r.stdout, r.stdout
        peaks.append(int(re.search(r"^HWM (\d+)$", r.stdout, re.M).group(1)) / 1024)
        if run == 0:
            assert "cached the int8 layout" in r.stderr and "converting the tokenizer" in r.stderr, r.stderr[-3000:]
    out, err = r.stdout, r.stderr
    assert "HEAVY []" in out, out
    assert "GC True True" in out, out  # the collector paused for the start, then back, start-up's objects frozen
    assert "start phases" in err and "first token" in err
    if sys.platform.startswith("linux"):  # the second start backed the weight arena while the engine loaded
        assert "weight arena: in the map backed during start-up" in err, err[-3000:]
    assert peaks[0] < 1024 and peaks[1] < 512, (peaks, err[-3000:])


def test_a_start_from_the_layout_cache_needs_no_torch_and_gives_the_tokens_of_the_built_model(tiny_ggufs, tmp_path):
    """The first start quantizes in torch and stores the layout; the next runs from the layout's arrays
    without importing torch, and its tokens are those of the model built in torch (the native step reads
    the same int8 values and the same RoPE table either way). A seeded sampled request with logprobs needs
    no torch either, and draws what a process that had torch from the start draws."""
    import json

    src = tmp_path / "m.gguf"
    shutil.copy(tiny_ggufs["Q8_0"], src)
    probe = ("import sys; from kvstrata.cli.main import main; rc = main(sys.argv[1:]); "
             "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")

    def run(*extra: str, **env: str) -> tuple[list[int], str]:
        r = subprocess.run([sys.executable, "-c", probe, "generate", "--model", str(src), "--json", "--max-tokens", "24",
                            "--ignore-eos", "--kv-device-bytes", "4M", *extra, "The quick brown fox"],
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        lines = r.stdout.splitlines()
        return json.loads(lines[0])["token_ids"], lines[-1]

    built, first = run()
    assert first == "TORCH True"  # (nothing cached yet: quantized in torch)
    cached, second = run()
    assert second == "TORCH False" and cached == built and len(cached) == 24
    assert run(KVSTRATA_LAYOUT_CACHE="0") == (built, "TORCH True")
    sampled, third = run("--temperature", "0.8", "--seed", "3", "--logprobs", "2")
    assert third == "TORCH False"
    llm = LLM(str(src), kv_device_bytes="4M")
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=3)
    assert llm.generate("The quick brown fox", params)[0].outputs[0].token_ids == sampled
    assert llm.generate("The quick brown fox", SamplingParams(max_tokens=24, ignore_eos=True))[0].outputs[0].token_ids == built


def test_an_hf_checkpoint_starts_from_the_layout_cache_without_torch(tiny_llama, tmp_path):
    """An HF checkpoint is opened from its shards' headers and a few values read with numpy, so once its
    layout is cached a start imports no torch, and gives the tokens of the start that built it."""
    import json

    d = tmp_path / "hf"
    shutil.copytree(tiny_llama, d)
    probe = ("import sys; from kvstrata.cli.main import main; rc = main(sys.argv[1:]); "
             "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")

    def run() -> tuple[list[int], str]:
        r = subprocess.run([sys.executable, "-c", probe, "generate", "--model", str(d), "--json", "--max-tokens", "16",
                            "--ignore-eos", "--kv-device-bytes", "4M", "The quick brown fox"],
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        lines = r.stdout.splitlines()
        return json.loads(lines[0])["token_ids"], lines[-1]

    built, first = run()
    assert first == "TORCH True"  # (nothing cached yet: built in torch)
    assert run() == (built, "TORCH False") and len(built) == 16


def test_serve_with_tiers_answers_sampled_session_and_structured_requests_without_torch(tiny_ggufs, tmp_path):
    """`kvstrata serve` with `make serve`'s tiers (host and disk) on a model whose layout is cached: a
    sampled completion with logprobs, a session's two chat turns (its blocks written behind to the disk
    tier, the second turn reusing them) and a json_object request all answer, and torch's library is never
    mapped into the server process (the server, its tiers and its sampler run on numpy)."""
    import httpx

    from tests.server.harness import ServerProcess

    src = tmp_path / "m.gguf"
    shutil.copy(tiny_ggufs["Q8_0"], src)
    LLM(str(src), kv_device_bytes="4M")  # (builds and stores the layout: this process has torch)
    srv = ServerProcess(["--model", str(src), "--served-model-name", "tiny", "--kv-device-bytes", "8M",
                         "--kv-host-bytes", "8M", "--kv-disk-dir", str(tmp_path / "kv"),
                         "--session-store", f"sqlite:///{tmp_path / 'sessions.db'}"], tmp_path / "serve.log")
    try:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0.9, "seed": 4,
            "logprobs": 2, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == 8
        msgs = [{"role": "user", "content": "Tell me about foxes and dogs. " * 8}]
        for turn in range(2):
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers={"X-Session-Id": "s1"},
                           json={"model": "tiny", "messages": msgs, "max_tokens": 6, "temperature": 0.7})
            assert r.status_code == 200, r.text
            msgs += [r.json()["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the first turn's KV reused
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "A JSON object, please."}], "max_tokens": 24,
            "response_format": {"type": "json_object"}})
        assert r.status_code == 200, r.text
        assert list((tmp_path / "kv").rglob("*")), "nothing was written to the disk tier"
        maps = Path(f"/proc/{srv.proc.pid}/maps").read_text() if sys.platform.startswith("linux") else ""
        assert "libtorch_cpu" not in maps, srv.output()
    finally:
        srv.close()


def test_the_rope_table_for_fewer_positions_is_a_prefix_of_the_stored_one():
    """The layout stores the RoPE tables for every position the model has; an engine of a shorter
    max_model_len slices them, where a model built in torch builds its own table for its length: the
    two must be the same bits, with any thread count, or the first start (built) and later ones (from
    the layout) would give different tokens."""
    from kvstrata.model.layers import Rotary, rope_inv_freq

    cfg = load_model("default").config
    rot = Rotary(rope_inv_freq(cfg))
    full = rot._cos_sin(torch.arange(cfg.max_position_embeddings))
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, threads, max(1, threads // 2)}):
            torch.set_num_threads(n)
            for length in (1, 7, 511, 512, 3001, 4096, cfg.max_position_embeddings):
                rot.build_table(length, torch.float32)
                assert torch.equal(rot.cos_table, full[0][:length]) and torch.equal(rot.sin_table, full[1][:length])
    finally:
        torch.set_num_threads(threads)


def test_the_collector_is_paused_for_a_start_and_back_afterwards(tiny_llama):
    import gc

    from kvstrata.startup import hold_gc, release_gc

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    seen = []
    from kvstrata.engine import llm_engine

    real = llm_engine.LLMEngine._build
    try:  # an engine built inside any program: paused during the build, as it was afterwards, nothing frozen
        llm_engine.LLMEngine._build = lambda self, *a: (seen.append(gc.isenabled()), real(self, *a))[1]
        LLM(str(tiny_llama), kv_device_bytes="4M")
    finally:
        llm_engine.LLMEngine._build = real
    assert seen == [False] and gc.isenabled() and gc.get_freeze_count() == frozen
    # a command run in-process (argv given) leaves the collector on and the caller's objects unfrozen,
    # also when it fails
    assert main(["generate", "--model", str(tmp := tiny_llama.parent / "missing.gguf")]) == 2 and not tmp.exists()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    hold_gc(freeze=False)
    assert not gc.isenabled()
    release_gc()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    release_gc()  # (a second release, or one without a hold, changes nothing)
    assert gc.isenabled()


def test_the_ggml_type_table_agrees_with_the_gguf_package():
    import gguf
    import numpy as np

    from kvstrata.loader.gguf_loader import DEQUANTIZABLE
    from kvstrata.loader.gguf_reader import GGML_TYPES

    for type_id, (name, block, size) in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert (qtype.name, block, size) == (name, *gguf.GGML_QUANT_SIZES[qtype])
    for name in DEQUANTIZABLE:  # each type said to be dequantizable is, for a row of any length of blocks
        qtype = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        row = np.zeros((2, size * (256 // block if block < 256 else 1)), np.uint8)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            row = row.view({1: np.uint8, 2: np.float16, 4: np.float32}[size]) if name != "BF16" else row
        assert gguf.quants.dequantize(row, qtype).size == 2 * 256


def test_the_time_since_process_start_is_read_to_the_clock_tick():
    # the process start from /proc in clock ticks against the clock since boot: never later than the
    # parent saw the child start (/proc/stat's btime is whole seconds and made it up to 1 s late)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", "from kvstrata.startup import since_process_start as s; print(s())"],
                         capture_output=True, text=True, check=True).stdout
    elapsed = time.time() - t0
    assert 0.0 <= float(out) <= elapsed + 0.011


def test_a_module_another_thread_is_still_importing_is_not_used(monkeypatch, tmp_path):
    """An engine step beside a thread importing torch once asked the half-built module for its thread
    count and failed ("partially initialized module 'torch' has no attribute 'get_num_threads'"): a module
    whose import has not finished reads as absent, and the step counts its threads without it."""
    import importlib.machinery
    import types

    from kvstrata.core import imported
    from kvstrata.native import _default_threads, default_threads

    (tmp_path / "slow_kv_mod.py").write_text("from kvstrata.core import imported\nDURING = imported('slow_kv_mod')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import slow_kv_mod

    assert slow_kv_mod.DURING is None and imported("slow_kv_mod") is slow_kv_mod and imported("no_such_kv_mod") is None
    half = types.ModuleType("torch")  # what sys.modules holds while another thread runs torch's __init__
    half.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    half.__spec__._initializing = True
    monkeypatch.setitem(sys.modules, "torch", half)
    assert default_threads() == _default_threads()
