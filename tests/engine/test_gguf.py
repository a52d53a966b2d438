"""GGUF loading for each quantization type, against transformers with the same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from kvstrata import LLM, SamplingParams
from tests.engine.gguf_writer import reference_from, write_gguf
from tests.engine.test_reference import _hf_greedy


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint

    # rows of 256 so the K-quants (256-wide super-blocks) can quantize every matrix
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide-llama"), "llama", hidden_size=256,
                                intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=512, initializer_range=0.1)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"])
def test_gguf_quant_types_match_reference(wide_llama, tmp_path, qtype):
    import gguf

    path = tmp_path / f"m-{qtype}.gguf"
    try:
        weights = write_gguf(wide_llama, path, qtype)
    except gguf.quants.QuantError as e:  # pragma: no cover - depends on the gguf package
        pytest.fail(f"gguf cannot quantize {qtype} here: {e}")
    llm = LLM(str(path), kv_device_bytes="16M", quantization="none")  # the exact path: dequantization checked
    ref = reference_from(wide_llama, weights)
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0, -1]
    out = llm.generate([ids], SamplingParams(max_tokens=24, ignore_eos=True, logprobs=1))[0].outputs[0]
    assert out.token_ids == _hf_greedy(ref, ids, 24)
    assert abs(out.logprobs[0].logprob - torch.log_softmax(theirs, -1)[out.token_ids[0]].item()) < 1e-3


def test_gguf_tokenizer_from_metadata_matches_tokenizer_json(wide_llama, tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "m.gguf"
    write_gguf(wide_llama, path, "F32")
    llm = LLM(str(path), kv_device_bytes="16M")
    ref = Tokenizer.from_file(str(wide_llama / "tokenizer.json"))
    for text in ["The quick brown fox", "Grüße aus Köln 🚀", "def f(n):\n  return n"]:
        assert llm.tokenizer.encode(text, add_special_tokens=False) == ref.encode(text).ids
