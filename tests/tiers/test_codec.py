"""Block codec: exact raw round trips, bounded int8 error, and every corruption caught with its reason."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from kvstrata.core import KvstrataError, block_key
from kvstrata.tiers import codec
from tests.tiers.blocks import FP, SHAPE, make_block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_raw_round_trip_is_exact(dtype):
    b = make_block(1, dtype=dtype)
    y = codec.decode(b.blob(), FP, b.key, b.token_ids)
    assert y.dtype == dtype and tuple(y.shape) == SHAPE
    assert torch.equal(y, b.x)


def test_raw_round_trip_from_bytearray_and_into_out():
    b = make_block(2)
    y = codec.decode(bytearray(b.blob()), FP, b.key, b.token_ids)
    assert torch.equal(y, b.x)
    out = torch.zeros(SHAPE, dtype=torch.float64)
    assert codec.decode(b.blob(), FP, b.key, b.token_ids, out=out) is out
    assert torch.equal(out, b.x.double())
    with pytest.raises(KvstrataError):
        codec.decode(b.blob(), FP, b.key, b.token_ids, out=torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_within_half_a_step_per_channel(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=g) * torch.rand(1, 2, 1, 2, 8, generator=g) * 10).to(dtype)
    x[0, 1, :, 1, 3] = 0.0  # an all-zero channel must survive (no division by zero)
    key = block_key(None, [1, 2, 3, 4], FP)
    blob = codec.encode(x, key=key, token_ids=[1, 2, 3, 4], fingerprint=FP, codec="int8")
    y = codec.decode(blob, FP, key, [1, 2, 3, 4])
    assert y.dtype == dtype
    xf = x.float()
    # Independent bound: symmetric int8 over each (K|V, layer, head, dim) channel rounds to within half
    # a step, step = max|x| over the block's tokens / 127; plus the output dtype's own rounding.
    step = xf.abs().amax(dim=2, keepdim=True) / 127
    out_rounding = xf.abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6)
    assert bool(((y.float() - xf).abs() <= step / 2 + out_rounding + 1e-7).all())
    assert bool((y[0, 1, :, 1, 3] == 0).all())
    # payload: one byte per element plus one float32 scale per channel (4 tokens share a scale here)
    h = codec.read_header(blob)
    assert h.payload_len == x.numel() + 2 * 2 * 2 * 8 * 4


def test_int8_needs_a_five_dim_block():
    with pytest.raises(KvstrataError, match="int8"):
        codec.encode(torch.zeros(4, 4), key=b"k" * 32, token_ids=[], fingerprint=FP, codec="int8")


def test_unknown_codec_and_dtype_are_user_errors():
    b = make_block(0)
    with pytest.raises(KvstrataError, match="unknown KV codec"):
        codec.encode(b.x, key=b.key, token_ids=b.token_ids, fingerprint=FP, codec="zstd")
    with pytest.raises(KvstrataError, match="dtype"):
        codec.encode(b.x.double(), key=b.key, token_ids=b.token_ids, fingerprint=FP)


def _with_header_crc(blob: bytes) -> bytes:
    """Recompute the header CRC after a deliberate header edit (to reach the checks behind it)."""
    header_len = struct.unpack_from("<I", blob, 8)[0]
    head = blob[: header_len - 4]
    return head + struct.pack("<I", zlib.crc32(head)) + blob[header_len:]


def _expect(blob, exc, key=None, token_ids=None, fingerprint=FP):
    b = make_block(5)
    with pytest.raises(exc) as info:
        codec.decode(blob, fingerprint, key or b.key, b.token_ids if token_ids is None else token_ids)
    assert isinstance(info.value, codec.CorruptBlockError)
    assert info.value.reason == exc.reason
    return info.value


@pytest.mark.parametrize("cut", [0, 3, 20, 100, -1, -500])
def test_truncated(cut):
    blob = make_block(5).blob()
    _expect(blob[:cut], codec.TruncatedBlockError)


def test_bad_magic():
    blob = make_block(5).blob()
    _expect(b"XXXX" + blob[4:], codec.BadMagicError)


def test_version():
    blob = bytearray(make_block(5).blob())
    struct.pack_into("<H", blob, 4, 99)
    _expect(_with_header_crc(bytes(blob)), codec.UnsupportedVersionError)


def test_version_1_blocks_carry_a_crc32_and_still_decode():
    """Blocks written before the XXH3 payload checksum (format version 1: the same bytes, CRC-32) still
    decode, and their CRC is still checked; a version-2 block whose checksum is a CRC-32 is refused."""
    b = make_block(5)
    blob = bytearray(b.blob())
    assert struct.unpack_from("<H", blob, 4)[0] == 2
    header_len, payload_len = struct.unpack_from("<IQ", blob, 8)
    payload = bytes(blob[header_len:header_len + payload_len])
    struct.pack_into("<I", blob, 20, zlib.crc32(payload))
    _expect(_with_header_crc(bytes(blob)), codec.ChecksumError)  # still version 2: XXH3 expected
    struct.pack_into("<H", blob, 4, 1)
    old = _with_header_crc(bytes(blob))
    assert torch.equal(codec.decode(old, FP, b.key, b.token_ids), b.x)
    assert codec.read_header(old).version == 1
    flipped = bytearray(old)
    flipped[header_len + 7] ^= 0x01
    _expect(bytes(flipped), codec.ChecksumError)


def test_a_block_is_decoded_in_place_from_immutable_bytes():
    """A host or Redis tier hands out bytes: the decoded tensor reads them where they are (copying each
    block into fresh memory first cost a 4,096-token host restore 52 of its 227 ms)."""
    import ctypes

    b = make_block(3)
    blob = b.blob()
    assert isinstance(blob, bytes)
    x = codec.decode(blob, FP, b.key, b.token_ids)
    header_len = struct.unpack_from("<I", blob, 8)[0]
    assert x.data_ptr() == ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value + header_len
    assert torch.equal(x, b.x)


def test_flipped_header_byte():
    blob = bytearray(make_block(5).blob())
    blob[60] ^= 0x01  # inside the dtype name
    _expect(bytes(blob), codec.HeaderChecksumError)


@pytest.mark.parametrize("where", [0, 517, -1])
def test_flipped_payload_byte(where):
    b = make_block(5)
    blob = bytearray(b.blob())
    header_len = struct.unpack_from("<I", blob, 8)[0]
    pos = header_len + where if where >= 0 else len(blob) + where
    blob[pos] ^= 0x10
    _expect(bytes(blob), codec.ChecksumError)


def test_trailing_bytes():
    _expect(make_block(5).blob() + b"\0", codec.MalformedBlockError)


def test_wrong_fingerprint():
    b = make_block(5)
    _expect(b.blob(fingerprint="0" * 64), codec.FingerprintMismatchError)


def test_wrong_key():
    _expect(make_block(5).blob(), codec.KeyMismatchError, key=make_block(6).key)


def test_wrong_token_ids():
    b = make_block(5)
    _expect(b.blob(), codec.TokenMismatchError, token_ids=b.token_ids[:-1] + [b.token_ids[-1] + 1])
    _expect(b.blob(), codec.TokenMismatchError, token_ids=b.token_ids[:-1])


def test_verify_without_expectations_checks_self_consistency():
    b = make_block(5)
    h = codec.verify(b.blob())
    assert (h.key, h.fingerprint, h.token_ids, h.shape, h.codec) == (b.key, FP, tuple(b.token_ids), SHAPE, "raw")
    blob = bytearray(b.blob())
    blob[-3] ^= 0xFF
    with pytest.raises(codec.ChecksumError):
        codec.verify(bytes(blob))


def test_recode_keeps_identity():
    b = make_block(5)
    blob8 = codec.recode(b.blob(), "int8")
    assert codec.read_header(blob8).codec == "int8"
    y = codec.decode(blob8, FP, b.key, b.token_ids)
    assert torch.allclose(y, b.x, atol=float(b.x.abs().max()) / 127)
    assert codec.recode(b.blob(), "raw") == b.blob()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_numpy_payloads_encode_and_decode_as_the_torch_ops_did(dtype):
    """The codec's arithmetic is numpy: a block given as an array or as a tensor encodes to the same bytes,
    the int8 payload is byte for byte the torch formula it replaced (scale = max|x| / 127 per channel,
    round halves to even, clamp), and `numpy=True` decodes to arrays (tensors for bfloat16)."""
    import numpy as np

    x = make_block(5, dtype=dtype).x
    x[0, 0, :, 0, 0] = 0.0  # an all-zero channel: scale 1
    x[1, 0, 3, 1, 2] = 2.5 * (x[1, 0, :, 1, 2].abs().max() / 127.0)  # (a value on a rounding half)
    key = block_key(None, list(range(SHAPE[2])), FP)
    toks = list(range(SHAPE[2]))
    for name in ("raw", "int8"):
        blob = codec.encode(x, key=key, token_ids=toks, fingerprint=FP, codec=name)
        if dtype != torch.bfloat16:
            assert codec.encode(x.numpy(), key=key, token_ids=toks, fingerprint=FP, codec=name) == blob
        if name == "int8":
            xf = x.float()
            scale = xf.abs().amax(dim=2, keepdim=True) / 127.0
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
            h = codec.read_header(blob)
            assert blob[h.header_len:] == q.numpy().tobytes() + scale.numpy().tobytes()
            want = (q.float() * scale).to(dtype)
        else:
            want = x
        got = codec.decode(blob, FP, key, toks, numpy=True)
        assert isinstance(got, np.ndarray) == (dtype != torch.bfloat16)
        assert torch.equal(torch.as_tensor(got) if isinstance(got, np.ndarray) else got, want)
        assert torch.equal(codec.decode(blob, FP, key, toks), want)
