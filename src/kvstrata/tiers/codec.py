"""Block codec: a self-describing, checksummed byte format for one KV block, with `raw` and `int8` payloads.

Byte layout (little-endian; `docs/tiers.md` has the table):

    0   4  magic b"KVSB"
    4   2  format version (u16) = 2 (1 is still read: the same bytes, a CRC-32 payload checksum)
    6   2  flags (u16) = 0, reserved
    8   4  header_len (u32): bytes of the whole header, trailing header CRC included
    12  8  payload_len (u64)
    20  4  payload checksum: the low 32 bits of XXH3-64 of the payload bytes (version 1: CRC-32)
    24 32  block key (kvstrata.core.block_key)
    56  .  dtype name  (u8 length + ASCII, e.g. "bfloat16")
    .   .  codec name  (u8 length + ASCII: "raw" | "int8")
    .   .  model fingerprint (u16 length + UTF-8)
    .   .  shape (u8 ndim + ndim x u32): the decoded tensor's shape, (2, L, T, H, D)
    .   .  token ids (u32 count + count x i32)
    .   .  zero padding so that header_len is a multiple of 16
    .   4  header CRC-32 of every header byte before it
    then payload_len bytes of payload.

Payloads are numpy arrays (what a CPU engine's pool gives: no torch needed) or torch tensors; `decode`
returns a tensor, or with `numpy=True` an array where numpy has the dtype (float32, float16).

The payload checksum detects storage and transfer corruption; it is not a defence against an attacker
who can write into the tier (use a private Redis for that). XXH3 (xxhash) runs at ~20 GB/s on one core
here, where zlib's CRC-32 did 4-7 and blake2b ~1.3: CRC-32 was ~15 % of a 4,096-token restore from the
host tier. The header, ~200 bytes, keeps its CRC-32.
"""

from __future__ import annotations

import logging
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from kvstrata.core import BLOCK_KEY_BYTES, KvstrataError, dtype_name

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAGIC = b"KVSB"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # 1: the payload checksum is CRC-32
_FIXED = struct.Struct("<4sHHIQI32s")  # magic, version, flags, header_len, payload_len, payload_crc, key
_CRC = struct.Struct("<I")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes a block may hold
_NUMPY = {"float32": np.float32, "float16": np.float16}  # those numpy has
Payload = Any  # a (2, L, T, H, D) numpy array or CPU torch tensor
MAX_HEADER_BYTES = 1 << 20
HEADER_ALIGN = 16

assert sys.byteorder == "little", "the block format assumes a little-endian host"


# ---- errors: one subclass per reason, `reason` is the stats label ---------------------------------


class CorruptBlockError(KvstrataError):
    """A stored block failed verification; it must be discarded (and recomputed), never used."""

    reason = "corrupt"

    def __init__(self, detail: str) -> None:
        super().__init__(f"corrupt KV block ({self.reason}): {detail}; discard it, it will be recomputed")
        self.detail = detail


class TruncatedBlockError(CorruptBlockError):
    reason = "truncated"


class BadMagicError(CorruptBlockError):
    reason = "bad_magic"


class UnsupportedVersionError(CorruptBlockError):
    reason = "version"


class HeaderChecksumError(CorruptBlockError):
    reason = "header_checksum"


class MalformedBlockError(CorruptBlockError):
    reason = "malformed"


class FingerprintMismatchError(CorruptBlockError):
    reason = "fingerprint"


class KeyMismatchError(CorruptBlockError):
    reason = "key"


class TokenMismatchError(CorruptBlockError):
    reason = "tokens"


class ChecksumError(CorruptBlockError):
    reason = "checksum"


# ---- payload codecs ------------------------------------------------------------------------------


def _as_bytes_view(x: Payload) -> memoryview:
    """The bytes of a contiguous CPU tensor or array, without a copy."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).reshape(-1).view(np.uint8).data
    import torch

    return x.contiguous().reshape(-1).view(torch.uint8).numpy().data


def _name(x: Payload) -> str:
    return dtype_name(x.dtype)


# A tensor over a read-only buffer (a host tier's immutable bytes) is only ever read here (decode's
# contract); torch warns once that it could not protect it, which is no news to this module.
for _msg in ("The given buffer is not writable", "The given NumPy array is not writable"):
    warnings.filterwarnings("ignore", message=_msg, category=UserWarning, module=__name__.replace(".", r"\."))


def _array_from(buf: memoryview, dtype: Any, shape: Sequence[int]) -> np.ndarray:
    """A read-only array over `buf`, never a copy: copying each restored block into fresh memory first
    (one page fault per 4 KiB) cost a 4,096-token host-tier restore 52 of its 227 ms."""
    if len(buf) == 0:
        return np.empty(tuple(shape), dtype=dtype)
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(shape))


def _as_kind(x: np.ndarray, dtype: str, numpy: bool) -> Payload:
    """`x` (the block's values in numpy, or its 16-bit patterns for bfloat16) as the kind asked for."""
    if numpy and dtype in _NUMPY:
        return x
    import torch

    if not x.size:
        return torch.empty(x.shape, dtype=getattr(torch, dtype))
    t = torch.from_numpy(x)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class PayloadCodec:
    """Turns a KV block into payload bytes and back. `payload_nbytes` lets decode check sizes."""

    name = "?"

    def encode(self, x: Payload) -> list[memoryview]:
        raise NotImplementedError

    def payload_nbytes(self, shape: Sequence[int], dtype: Any) -> int:
        raise NotImplementedError

    def decode(self, buf: memoryview, shape: Sequence[int], dtype: Any, numpy: bool = False) -> Payload:
        """The block as a torch tensor, or with `numpy` a numpy array where numpy has the dtype."""
        raise NotImplementedError


class RawCodec(PayloadCodec):
    """The block's bytes as they are: exact."""

    name = "raw"

    def encode(self, x: Payload) -> list[memoryview]:
        return [_as_bytes_view(x)]

    def payload_nbytes(self, shape: Sequence[int], dtype: Any) -> int:
        n = 1
        for s in shape:
            n *= int(s)
        return n * _ITEMSIZE[dtype_name(dtype)]

    def decode(self, buf: memoryview, shape: Sequence[int], dtype: Any, numpy: bool = False) -> Payload:
        name = dtype_name(dtype)
        return _as_kind(_array_from(buf, _NUMPY.get(name, np.uint16), shape), name, numpy)


class Int8Codec(PayloadCodec):
    """Per-channel symmetric int8 for cold tiers.

    x: (2, L, T, H, D). A channel is one (K|V, layer, head, dim) column across the block's T tokens:
    scale = max|x| / 127 over T, q = round(x / scale) in [-127, 127] (halves to even); so
    |x - q*scale| <= scale / 2. Payload: q as int8 (2*L*T*H*D bytes) then scales as float32
    (2*L*1*H*D*4 bytes). In numpy (torch only to widen bfloat16): the same float32 operations, the same
    bytes as the torch ops they replaced.
    """

    name = "int8"

    def encode(self, x: Payload) -> list[memoryview]:
        if x.ndim != 5:
            raise KvstrataError(f"int8 codec needs a (2, L, T, H, D) block, got shape {tuple(x.shape)}")
        xf = x.astype(np.float32) if isinstance(x, np.ndarray) else x.float().numpy()
        scale = np.abs(xf).max(axis=2, keepdims=True) / np.float32(127.0)  # (2, L, 1, H, D)
        scale = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.round(xf / scale), -127, 127).astype(np.int8)
        return [_as_bytes_view(q), _as_bytes_view(scale)]

    def payload_nbytes(self, shape: Sequence[int], dtype: Any) -> int:
        two, layers, tokens, heads, dim = (int(s) for s in shape)
        return two * layers * tokens * heads * dim + two * layers * heads * dim * 4

    def decode(self, buf: memoryview, shape: Sequence[int], dtype: Any, numpy: bool = False) -> Payload:
        two, layers, tokens, heads, dim = (int(s) for s in shape)
        nq = two * layers * tokens * heads * dim
        q = _array_from(buf[:nq], np.int8, shape)
        scale = _array_from(buf[nq:], np.float32, (two, layers, 1, heads, dim))
        x = q.astype(np.float32) * scale
        name = dtype_name(dtype)
        if name in _NUMPY:
            return _as_kind(x.astype(_NUMPY[name], copy=False), name, numpy)
        import torch

        return torch.from_numpy(x).to(getattr(torch, name))


CODECS: dict[str, PayloadCodec] = {c.name: c for c in (RawCodec(), Int8Codec())}


def get_codec(name: str) -> PayloadCodec:
    try:
        return CODECS[name]
    except KeyError:
        raise KvstrataError(f"unknown KV codec {name!r}; choose one of {sorted(CODECS)}") from None


def max_encoded_bytes(shape: Sequence[int], dtype: Any, fingerprint_len: int = 64) -> int:
    """The most bytes one block of `shape` (2, L, T, H, D) and `dtype` encodes to in any codec: a tier can
    check a stored blob's size against it before reading it (a larger file cannot be a block)."""
    payload = max(c.payload_nbytes(shape, dtype) for c in CODECS.values())
    names = 2 * (1 + 255)  # dtype and codec names, each a u8 length and at most 255 bytes
    header = _FIXED.size + names + 2 + fingerprint_len + 1 + 4 * len(shape) + 4 + 4 * int(shape[2])
    return header + HEADER_ALIGN + _CRC.size + payload


# ---- header --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockHeader:
    version: int
    key: bytes
    dtype_name: str  # "float32", "bfloat16", "float16"
    codec: str
    fingerprint: str
    shape: tuple[int, ...]
    token_ids: tuple[int, ...]
    header_len: int
    payload_len: int
    payload_crc: int  # (the payload checksum: CRC-32 in version 1, XXH3 in version 2)

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)


def _payload_check(version: int, parts: Sequence[memoryview | bytes]) -> int:
    """The payload checksum a block of `version` carries, over its payload given in parts."""
    if version == 1:
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        return crc
    import xxhash

    if len(parts) == 1:
        return xxhash.xxh3_64_intdigest(parts[0]) & 0xFFFFFFFF
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.intdigest() & 0xFFFFFFFF


def _pack_header(key: bytes, dtype: str, codec: str, fingerprint: str, shape: Sequence[int],
                 token_ids: Sequence[int], payload_len: int, payload_crc: int) -> bytes:
    dname, fp = dtype.encode(), fingerprint.encode()
    var = b"".join([
        struct.pack("<B", len(dname)), dname,
        struct.pack("<B", len(codec)), codec.encode(),
        struct.pack("<H", len(fp)), fp,
        struct.pack(f"<B{len(shape)}I", len(shape), *shape),
        struct.pack(f"<I{len(token_ids)}i", len(token_ids), *token_ids),
    ])
    pad = -(_FIXED.size + len(var) + _CRC.size) % HEADER_ALIGN  # payload starts 16-byte aligned
    var += b"\0" * pad
    header_len = _FIXED.size + len(var) + _CRC.size
    head = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, header_len, payload_len, payload_crc, key) + var
    return head + _CRC.pack(zlib.crc32(head))


def encode(x: Payload, *, key: bytes, token_ids: Sequence[int], fingerprint: str, codec: str = "raw") -> bytes:
    """Encode one block. x: (2, L, T, H, D) numpy array (float32 / float16) or tensor (float32 /
    bfloat16 / float16; moved to the CPU)."""
    if _name(x) not in _ITEMSIZE:
        raise KvstrataError(f"KV dtype {x.dtype} is not supported by the block codec; use {sorted(_ITEMSIZE)}")
    if len(key) != BLOCK_KEY_BYTES:
        raise KvstrataError(f"block key must be {BLOCK_KEY_BYTES} bytes, got {len(key)}")
    if not isinstance(x, np.ndarray):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
    parts = get_codec(codec).encode(x)
    payload_len = sum(p.nbytes for p in parts)
    header = _pack_header(key, _name(x), codec, fingerprint, tuple(x.shape), token_ids, payload_len,
                          _payload_check(FORMAT_VERSION, parts))
    return b"".join([header, *parts])


def read_header(blob: bytes | bytearray | memoryview, *, header_only: bool = False) -> BlockHeader:
    """Parse and check the header's own consistency (magic, version, header CRC, lengths).

    `header_only`: `blob` may be just the first bytes of a block (at least the header); the payload's
    length is then not checked.
    """
    mv = memoryview(blob)
    if len(mv) < len(MAGIC):
        raise TruncatedBlockError(f"{len(mv)} bytes, shorter than the magic")
    if bytes(mv[:4]) != MAGIC:
        raise BadMagicError(f"starts with {bytes(mv[:4])!r}, not {MAGIC!r}")
    if len(mv) < _FIXED.size + _CRC.size:
        raise TruncatedBlockError(f"{len(mv)} bytes, shorter than the fixed header")
    _, version, _flags, header_len, payload_len, payload_crc, key = _FIXED.unpack_from(mv, 0)
    if version not in READ_VERSIONS:
        raise UnsupportedVersionError(f"format version {version}, this build reads {', '.join(map(str, READ_VERSIONS))}")
    if not (_FIXED.size + _CRC.size <= header_len <= MAX_HEADER_BYTES):
        raise MalformedBlockError(f"header length {header_len} out of range")
    if len(mv) < header_len:
        raise TruncatedBlockError(f"{len(mv)} bytes, header says the header alone is {header_len}")
    (hcrc,) = _CRC.unpack_from(mv, header_len - _CRC.size)
    if zlib.crc32(mv[: header_len - _CRC.size]) != hcrc:
        raise HeaderChecksumError("header CRC does not match the header bytes")
    try:
        off = _FIXED.size
        (n,) = struct.unpack_from("<B", mv, off)
        dname = bytes(mv[off + 1 : off + 1 + n]).decode()
        off += 1 + n
        (n,) = struct.unpack_from("<B", mv, off)
        codec = bytes(mv[off + 1 : off + 1 + n]).decode()
        off += 1 + n
        (n,) = struct.unpack_from("<H", mv, off)
        fingerprint = bytes(mv[off + 2 : off + 2 + n]).decode()
        off += 2 + n
        (n,) = struct.unpack_from("<B", mv, off)
        shape = struct.unpack_from(f"<{n}I", mv, off + 1)
        off += 1 + 4 * n
        (n,) = struct.unpack_from("<I", mv, off)
        token_ids = struct.unpack_from(f"<{n}i", mv, off + 4)
        off += 4 + 4 * n
    except (struct.error, UnicodeDecodeError) as e:
        raise MalformedBlockError(f"header fields do not parse ({e})") from None
    if off > header_len - _CRC.size or any(mv[off : header_len - _CRC.size]):
        raise MalformedBlockError(f"header fields end at {off}, header_len says {header_len - _CRC.size}")
    if dname not in _ITEMSIZE or codec not in CODECS:
        raise MalformedBlockError(f"unknown dtype {dname!r} or codec {codec!r}")
    try:
        expected_payload = CODECS[codec].payload_nbytes(shape, dname)
    except (ValueError, TypeError):
        raise MalformedBlockError(f"shape {shape} does not suit codec {codec!r}") from None
    if payload_len != expected_payload:
        raise MalformedBlockError(f"payload_len {payload_len} but {codec} {dname} {shape} needs {expected_payload}")
    if header_only:
        pass
    elif len(mv) < header_len + payload_len:
        raise TruncatedBlockError(f"{len(mv)} bytes, header says {header_len + payload_len}")
    elif len(mv) > header_len + payload_len:
        raise MalformedBlockError(f"{len(mv) - header_len - payload_len} bytes after the payload")
    return BlockHeader(version, bytes(key), dname, codec, fingerprint, tuple(shape), tuple(token_ids),
                       header_len, payload_len, payload_crc)


def header_len_of(prefix: bytes | bytearray | memoryview) -> int:
    """The header length a block starting with `prefix` (>= 24 bytes) declares; 0 if not a block."""
    if len(prefix) < _FIXED.size or bytes(prefix[:4]) != MAGIC:
        return 0
    return int(_FIXED.unpack_from(prefix, 0)[3])


def verify(blob: bytes | bytearray | memoryview, *, expected_fingerprint: str | None = None,
           expected_key: bytes | None = None, expected_token_ids: Sequence[int] | None = None) -> BlockHeader:
    """Check everything that can be checked without building the tensor; raise CorruptBlockError.

    Without expectations this is the self-consistency check of `kvstrata cache verify`.
    """
    h = read_header(blob)
    if expected_fingerprint is not None and h.fingerprint != expected_fingerprint:
        raise FingerprintMismatchError(
            f"block is for model {h.fingerprint[:16]}…, expected {expected_fingerprint[:16]}…")
    if expected_key is not None and h.key != bytes(expected_key):
        raise KeyMismatchError(
            f"header key {h.key.hex()[:16]}… is not the requested {bytes(expected_key).hex()[:16]}…")
    if expected_token_ids is not None and h.token_ids != tuple(int(t) for t in expected_token_ids):
        raise TokenMismatchError(f"stored token ids differ from the {len(expected_token_ids)} expected ones")
    mv = memoryview(blob)
    if _payload_check(h.version, [mv[h.header_len : h.header_len + h.payload_len]]) != h.payload_crc:
        raise ChecksumError(f"payload {'CRC-32' if h.version == 1 else 'XXH3'} checksum does not match")
    return h


def decode(blob: bytes | bytearray | memoryview, expected_fingerprint: str, expected_key: bytes,
           expected_token_ids: Sequence[int], *, out: torch.Tensor | None = None, numpy: bool = False) -> Payload:
    """Verify `blob` against what the caller expects and return the block tensor (2, L, T, H, D) (with
    `numpy`, a numpy array where numpy has the block's dtype).

    Raises a CorruptBlockError subclass naming the reason. The result shares memory with `blob`: read it
    (copy it into the pool, encode it again), never write into it; with a bytearray blob, pass ownership
    or copy. With `out`, the block is copied
    into `out` (same shape, any dtype / device, e.g. a pinned staging buffer) and `out` is returned.
    """
    h = verify(blob, expected_fingerprint=expected_fingerprint, expected_key=expected_key,
               expected_token_ids=expected_token_ids)
    payload = memoryview(blob)[h.header_len : h.header_len + h.payload_len]
    x = CODECS[h.codec].decode(payload, h.shape, h.dtype_name, numpy=numpy and out is None)
    if out is None:
        return x
    if tuple(out.shape) != h.shape:
        raise KvstrataError(f"decode out= has shape {tuple(out.shape)}, the block is {h.shape}")
    return out.copy_(x)


def recode(blob: bytes | bytearray, codec: str) -> bytes:
    """Re-encode a (self-consistent) blob with another payload codec, keeping its header identity."""
    h = verify(blob)
    if h.codec == codec:
        return bytes(blob)
    payload = memoryview(blob)[h.header_len : h.header_len + h.payload_len]
    x = CODECS[h.codec].decode(payload, h.shape, h.dtype_name, numpy=True)
    return encode(x, key=h.key, token_ids=h.token_ids, fingerprint=h.fingerprint, codec=codec)
