"""A fast GGUF reader: header, metadata and tensor table parsed straight from a memory map.

The gguf package's GGUFReader builds a numpy object for every part of every value: ~147k of them for a
49k-token vocabulary with its merges, about 4 s on a 2-core machine. Here a scalar is one struct read, a
numeric array one `np.frombuffer`, a string array one pass over its lengths (its strings are decoded
only when asked for), and tensor data are views of the map: the default model's header reads in tens of
milliseconds. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3,
little-endian).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstrata.core import KvstrataError

_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_Q = struct.Struct("<Q")
# ggml types the gguf package hands out as typed arrays rather than bytes (its ReaderTensor.data)
_TYPED = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}
# ggml tensor types: id -> (name, values per block, bytes per block), as ggml.h and the gguf package's
# GGML_QUANT_SIZES define them (a test compares the two). Kept here so that reading a file's header does
# not import the gguf package (~0.1 s, most of it its YAML and metadata helpers); a newer type that is
# not listed is looked up there.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}


def _ggml_type(type_id: int) -> tuple[str, int, int] | None:
    """(name, values per block, bytes per block) of a ggml tensor type, or None where it is unknown."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # a type newer than the table

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        return None
    return (qtype.name, *GGML_QUANT_SIZES[qtype])


class _Corrupt(Exception):
    pass


class GGUFStrings(Sequence):
    """A GGUF array of strings, decoded on access (a vocabulary is only needed when a tokenizer is built)."""

    def __init__(self, buf, starts: list[int], lengths: list[int]) -> None:
        self._buf, self._starts, self._lengths = buf, starts, lengths

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s = self._starts[i]
        return self._buf[s : s + self._lengths[i]].decode("utf-8")

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"GGUFStrings({len(self)} strings)"


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the length of a row) first; torch's shape is the reverse
    ggml_type: int
    type_name: str  # e.g. "Q4_1", as gguf.GGMLQuantizationType names it
    offset: int  # absolute file offset of the tensor's first byte
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class GGUFFile:
    """One parsed GGUF file. `metadata` maps every key to its value: int / float / bool / str for
    scalars, a numpy array for numeric arrays, GGUFStrings for string arrays (nested arrays: lists).
    `metadata_span` is the byte range of the key-value section (what a converted tokenizer derives from)."""

    def __init__(self, path: str, mm: mmap.mmap, version: int, metadata: dict[str, Any],
                 tensors: list[GGUFTensorInfo], data_start: int, alignment: int, metadata_span: tuple[int, int]) -> None:
        self.path, self._mm, self.version = path, mm, version
        self.metadata, self.tensors = metadata, tensors
        self.data_start, self.alignment, self.metadata_span = data_start, alignment, metadata_span
        self.size = len(mm)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def raw_bytes(self, start: int, end: int) -> memoryview:
        return memoryview(self._mm)[start:end]

    def tensor_array(self, t: GGUFTensorInfo) -> np.ndarray:
        """The tensor's stored data as the gguf package presents it (and `gguf.quants.dequantize` takes):
        typed for F32 / F16 / integer types, else bytes shaped (rows..., bytes per row); read-only."""
        dims = tuple(reversed(t.shape))
        if t.ggml_type in _TYPED:
            return np.frombuffer(self._mm, dtype=_TYPED[t.ggml_type], count=t.n_elements, offset=t.offset).reshape(dims)
        row_bytes = t.nbytes // max(1, t.n_elements // t.shape[0]) if t.shape else t.nbytes
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(*dims[:-1], row_bytes)

    def tensor_bytes(self, t: GGUFTensorInfo) -> np.ndarray:
        """The tensor's raw bytes (uint8, read-only view of the map)."""
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)


def read_gguf(path: str) -> GGUFFile:
    """Parses `path`'s header, metadata and tensor table; raises KvstrataError on anything malformed
    (bad magic, an unsupported version, a length past the end, a truncated tensor)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise KvstrataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise KvstrataError(f"{path}: not a GGUF file ({size} bytes; truncated?)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, mm)
    except _Corrupt as e:
        mm.close()
        raise KvstrataError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None
    except (struct.error, ValueError, UnicodeDecodeError, OverflowError) as e:
        mm.close()
        raise KvstrataError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None


def _parse(path: str, mm: mmap.mmap) -> GGUFFile:
    if mm[:4] != _MAGIC:
        raise _Corrupt("bad magic (this is not a GGUF file)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise _Corrupt(f"GGUF version {version}{hint}; versions 2 and 3 are supported")
    size = len(mm)
    if n_tensors > size or n_kv > size:
        raise _Corrupt(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    r = _Cursor(mm, 24)
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.u32())
    span = (24, r.pos)
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if n_dims > 8:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", mm, r.take(8 * n_dims))
        type_id, rel = r.u32(), r.u64()
        known = _ggml_type(type_id)
        if known is None:
            raise _Corrupt(f"tensor {name!r} has unknown ggml type {type_id}")
        type_name, block, type_size = known
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        infos.append((name, tuple(int(d) for d in dims), type_id, type_name, rel, n * type_size // block))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-r.pos // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, ggml_type, type_name, rel, nbytes in infos:
        if name in seen:
            raise _Corrupt(f"tensor {name!r} appears twice")
        seen.add(name)
        end = data_start + rel + nbytes
        if end > size:
            raise KvstrataError(f"{path}: truncated GGUF file ({size} bytes, tensors need {end}); download it again")
        tensors.append(GGUFTensorInfo(name, dims, ggml_type, type_name, data_start + rel, nbytes))
    return GGUFFile(path, mm, version, metadata, tensors, data_start, alignment, span)


class _Cursor:
    def __init__(self, buf, pos: int) -> None:
        self.buf, self.pos, self.size = buf, pos, len(buf)

    def take(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.size:
            raise _Corrupt(f"a value at byte {p} runs past the end of the file")
        self.pos = p + n
        return p

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return _Q.unpack_from(self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        p = self.take(n)
        return self.buf[p : p + n].decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if count > self.size:
                raise _Corrupt(f"array of {count} elements in a {self.size}-byte file")
            if etype in _NUMPY:
                width = np.dtype(_NUMPY[etype]).itemsize
                return np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.take(width * count))
            if etype == _STRING:
                return self._strings(count)
            return [self.value(etype) for _ in range(count)]
        raise _Corrupt(f"unknown value type {vtype} at byte {self.pos}")

    def _strings(self, count: int) -> GGUFStrings:
        """Steps over `count` length-prefixed strings, recording where each lies (one tight loop)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _Q.unpack_from
        starts, lengths = [0] * count, [0] * count
        for i in range(count):
            n = unpack(buf, pos)[0]
            pos += 8
            starts[i], lengths[i] = pos, n
            pos += n
            if pos > size:
                raise _Corrupt(f"string {i} of an array runs past the end of the file")
        self.pos = pos
        return GGUFStrings(buf, starts, lengths)
