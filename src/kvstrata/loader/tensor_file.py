"""A cache file of named tensors: written once, memory-mapped back without a copy, verified before use.

Layout: 8-byte magic, u64 header length, a JSON header (the identity it was derived from, the bytes of
data, the checksum's name, and per tensor its dtype, shape, offset, byte count and checksum), then the
tensors' bytes, each 64-byte aligned. `load_tensors` returns None, and says why, for anything it cannot
trust: another identity (the source changed), a wrong size (a truncated or interrupted write), a header
that does not parse, a tensor out of bounds or a checksum that does not match. The caller then rebuilds
and overwrites it. Writes go to a temporary file renamed into place, so a reader never sees half a file
under the final name; no fsync (a file lost to a crash fails its checks).

The checksum is XXH3-64 (xxhash; ~20 GB/s here, where zlib's CRC-32 does ~4: 12 against 63 ms for the
default model's 250 MB layout, on every start); files that name none were written with CRC-32 and are
checked with it. Every byte is checked by reading the file in chunks into one small buffer, not through
the map: checking through the map would make all of it resident at once (a start's peak RSS), where the
engine needs its pages one at a time (the int8 weights while the native step copies them, the embedding
table a row per token).

`load_arrays` gives numpy views and needs no torch (the CPU fast path starts without importing it:
engine/layout.py); `load_tensors` gives the same views as torch tensors.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
MAGIC = b"KVSTENS1"
_ALIGN = 64
_CHECK_CHUNK = 4 << 20  # bytes read at a time while checking


CHECKSUM = "xxh3_64"  # what files are written with


def _checker(name: str):
    """A fresh (update, digest) pair for the checksum `name` (CHECKSUM, or "crc32" in older files)."""
    if name == "crc32":
        state = [0]
        return (lambda b: state.__setitem__(0, zlib.crc32(b, state[0]))), (lambda: state[0])
    if name == "xxh3_64":
        import xxhash

        h = xxhash.xxh3_64()
        return h.update, h.intdigest
    raise ValueError(f"unknown checksum {name!r}")


# numpy has no bfloat16: such tensors are read as their 16-bit patterns (load_tensors views them back)
_NP_DTYPES = {"bfloat16": np.dtype(np.uint16)}


def _np_dtype(name: str) -> np.dtype:
    if name in _NP_DTYPES:
        return _NP_DTYPES[name]
    try:
        dt = np.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}") from None
    if dt.kind not in "fiub" or dt.name != name:
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _name_and_bytes(t) -> tuple[str, list[int], memoryview]:
    """(dtype name, shape, bytes) of a torch tensor or a numpy array."""
    if isinstance(t, np.ndarray):
        a = np.ascontiguousarray(t)
        return a.dtype.name, list(a.shape), a.reshape(-1).view(np.uint8).data if a.size else memoryview(b"")
    import torch

    flat = t.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
    return str(t.dtype).removeprefix("torch."), list(t.shape), data


def _data_start(header_len: int) -> int:
    return -(-(16 + header_len) // _ALIGN) * _ALIGN


def save_tensors(path: Path, identity: str, tensors: dict[str, Any]) -> bool:
    """Writes the file (replacing any older one) from torch tensors or numpy arrays; False, with a warning,
    where the disk refuses or lacks room for twice its size (the cache is an optimization, never worth
    filling a disk)."""
    entries: list[list[Any]] = []
    datas: list[memoryview] = []
    offset = 0
    for name, t in tensors.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        dtype, shape, data = _name_and_bytes(t)
        entries.append([name, dtype, shape, offset, data.nbytes, 0])
        datas.append(data)
        offset += data.nbytes
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(path.parent).free < 2 * offset:
            log.warning("not caching %s: the disk has less than twice its %d bytes free", path, offset)
            return False
        for e, data in zip(entries, datas):
            update, digest = _checker(CHECKSUM)
            update(data)
            e[5] = digest()
        header = json.dumps({"identity": identity, "data_bytes": offset, "checksum": CHECKSUM,
                             "tensors": entries}).encode()
        start = _data_start(len(header))
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for e, data in zip(entries, datas):
                f.seek(start + e[3])
                f.write(data)
            f.truncate(start + offset)
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("could not write the cache file %s: %s", path, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def load_tensors(path: Path, identity: str):
    """The tensors, as torch views of a private (copy-on-write) map of the file, or None when the file is
    absent or cannot be trusted for `identity` (logged)."""
    arrays = load_arrays(path, identity)
    if arrays is None:
        return None
    return {name: as_tensor(a, dtype) for name, (a, dtype) in arrays.items()}


def as_tensor(a: np.ndarray, dtype: str):
    """A torch view of an array `load_arrays` gave, in the dtype the file names."""
    import torch

    t = torch.from_numpy(a) if a.size else torch.empty(a.shape, dtype=getattr(torch, dtype))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def load_arrays(path: Path, identity: str) -> dict[str, tuple[np.ndarray, str]] | None:
    """{name: (numpy view of a private map of the file, the dtype name written)}, or None when the file is
    absent or cannot be trusted for `identity` (logged). bfloat16 tensors come as uint16 bit patterns."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return _load(path, identity)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, struct.error) as e:
        log.warning("ignoring the cache file %s (it will be rebuilt): %s", path, e)
        return None


def _load(path: Path, identity: str) -> dict[str, tuple[np.ndarray, str]] | None:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise ValueError("not a kvstrata tensor file")
        (hlen,) = struct.unpack("<Q", head[8:])
        if hlen > min(size, 64 << 20):
            raise ValueError(f"header length {hlen} is implausible")
        header = json.loads(f.read(hlen))
        if header["identity"] != identity:
            log.info("the cache file %s was built from another version of its source: rebuilding", path)
            return None
        start = _data_start(hlen)
        if start + header["data_bytes"] != size:
            raise ValueError(f"{size} bytes where {start + header['data_bytes']} were written (truncated?)")
        algo = header.get("checksum", "crc32")
        buf = bytearray(_CHECK_CHUNK)
        view = memoryview(buf)
        entries = []
        for name, dtype, shape, offset, nbytes, check in header["tensors"]:
            dt = _np_dtype(dtype)
            n = 1
            for d in shape:
                n *= d
            lo = start + offset
            if offset < 0 or lo + nbytes > size or nbytes != n * dt.itemsize:
                raise ValueError(f"{name}: {nbytes} bytes at {offset} do not fit the file or its shape {shape}")
            update, digest = _checker(algo)
            f.seek(lo)
            left = nbytes
            while left:
                got = f.readinto(view[: min(left, _CHECK_CHUNK)])
                if not got:
                    raise ValueError(f"{name}: the file ended early")
                update(view[:got])
                left -= got
            if digest() != check:
                raise ValueError(f"{name}: checksum mismatch (the file is damaged)")
            entries.append((name, dtype, dt, shape, n, lo))
        view.release()
        flags = mmap.MAP_PRIVATE  # (not MAP_POPULATE: on a writable private map it copies every page)
        mm = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return {name: ((np.frombuffer(mm, dtype=dt, count=n, offset=lo) if n else np.empty(0, dtype=dt)).reshape(shape),
                   dtype) for name, dtype, dt, shape, n, lo in entries}


def drop_pages(t) -> None:
    """Returns the resident pages under a tensor or array that `load_tensors` / `load_arrays` mapped (and
    nobody wrote) to the page cache: RSS falls, and a later read faults them in again from the file. Only
    for such memory: on anonymous memory this would zero it."""
    import ctypes

    if isinstance(t, np.ndarray):
        ptr, nbytes = t.ctypes.data, t.nbytes
    else:
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    page = mmap.PAGESIZE
    start = -(-ptr // page) * page
    end = (ptr + nbytes) // page * page
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED

