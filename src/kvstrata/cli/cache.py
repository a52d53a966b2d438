"""`kvstrata cache stats | verify | clear`: inspect, check or empty the disk and Redis KV tiers.

`verify` cannot know which token ids a block should hold, so it checks each block's self-consistency:
the header parses (magic, version, header CRC), the key in the header is the file name / Redis key,
and the payload CRC holds. Corrupt blocks are reported and removed (kept with --dry-run); the exit
status is 1 when any were found, 0 when all blocks are sound.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter

from kvstrata.core import KvstrataError

logger = logging.getLogger(__name__)

HEADER_PEEK_BYTES = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["stats", "verify", "clear"],
                        help="stats: what is stored; verify: check every block, remove corrupt ones; "
                             "clear: remove every block")
    parser.add_argument("--kv-disk-dir", help="the disk tier's directory")
    parser.add_argument("--kv-redis-url", help="the remote tier's server, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--kv-redis-prefix", default="kvstrata:blk:",
                        help="namespace of this deployment's blocks in Redis (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="verify: report corrupt blocks, keep them")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _open_tiers(args: argparse.Namespace) -> list:
    if not (args.kv_disk_dir or args.kv_redis_url):
        raise KvstrataError("name a tier: --kv-disk-dir DIR and/or --kv-redis-url redis://HOST:PORT/DB")
    tiers = []
    if args.kv_disk_dir:
        from pathlib import Path

        from kvstrata.tiers.disk import DiskTier

        if not Path(args.kv_disk_dir).is_dir():
            raise KvstrataError(f"--kv-disk-dir {args.kv_disk_dir} is not a directory; give the engine's KV disk dir")
        tiers.append(DiskTier(args.kv_disk_dir))
    if args.kv_redis_url:
        from kvstrata.tiers.remote import RedisTier

        r = RedisTier(args.kv_redis_url, prefix=args.kv_redis_prefix)
        if not r.ping():
            raise KvstrataError(f"cannot reach Redis at {args.kv_redis_url}; check that the server runs and the URL")
        tiers.append(r)
    return tiers


def _location(tier) -> str:
    return str(getattr(tier, "root", "")) or f"{tier.url} {tier.prefix}*"


def _stats(tier) -> dict:
    from kvstrata.tiers import codec

    models, codecs, dtypes = Counter(), Counter(), Counter()
    blocks = nbytes = unreadable = 0
    for key in tier.keys():
        head = tier.peek(key, HEADER_PEEK_BYTES)
        if head is None:
            continue
        n = codec.header_len_of(head)
        if n > len(head):
            head = tier.peek(key, n)
        try:
            h = codec.read_header(head, header_only=True)
        except codec.CorruptBlockError:
            unreadable += 1
            continue
        blocks += 1
        nbytes += h.header_len + h.payload_len
        models[h.fingerprint[:16]] += 1
        codecs[h.codec] += 1
        dtypes[h.dtype_name] += 1
    return dict(tier=tier.name, location=_location(tier), blocks=blocks, bytes=nbytes, unreadable=unreadable,
                models=dict(models), codecs=dict(codecs), dtypes=dict(dtypes))


def _verify(tier, dry_run: bool, progress=None) -> dict:
    from kvstrata.tiers import codec

    keys = list(tier.keys())
    task = progress.add_task(f"verifying {tier.name}", total=len(keys)) if progress else None
    ok, corrupt = 0, []
    for key in keys:
        blob = tier.peek(key)
        if blob is not None:
            try:
                codec.verify(blob, expected_key=key)
                ok += 1
            except codec.CorruptBlockError as e:
                corrupt.append(dict(key=key.hex(), reason=e.reason, detail=e.detail))
                if not dry_run:
                    tier.remove(key)
        if progress:
            progress.advance(task)
    return dict(tier=tier.name, location=_location(tier), checked=ok + len(corrupt), ok=ok, corrupt=corrupt,
                removed=0 if dry_run else len(corrupt))


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    tiers = _open_tiers(args)
    try:
        if args.action == "stats":
            rows = [_stats(t) for t in tiers]
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            table = Table(title="KV tiers")
            for col in ("tier", "location", "blocks", "bytes", "models (fingerprint: blocks)", "codecs", "dtypes",
                        "unreadable"):
                table.add_column(col)
            for r in rows:
                fmt = lambda d: ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"  # noqa: E731
                table.add_row(r["tier"], r["location"], str(r["blocks"]), _fmt_bytes(r["bytes"]), fmt(r["models"]),
                              fmt(r["codecs"]), fmt(r["dtypes"]), str(r["unreadable"]))
            console.print(table)
            return 0
        if args.action == "verify":
            if args.json:
                rows = [_verify(t, args.dry_run) for t in tiers]
                print(json.dumps(rows, indent=2))
            else:
                with Progress(console=console, transient=True) as progress:
                    rows = [_verify(t, args.dry_run, progress) for t in tiers]
                table = Table(title="KV block verification")
                for col in ("tier", "checked", "ok", "corrupt", "removed"):
                    table.add_column(col)
                for r in rows:
                    table.add_row(r["tier"], str(r["checked"]), str(r["ok"]), str(len(r["corrupt"])), str(r["removed"]))
                console.print(table)
                bad = [(r["tier"], c) for r in rows for c in r["corrupt"]]
                if bad:
                    t2 = Table(title="corrupt blocks")
                    for col in ("tier", "key", "reason", "detail"):
                        t2.add_column(col)
                    for tier_name, c in bad:
                        t2.add_row(tier_name, c["key"][:16] + "…", c["reason"], c["detail"])
                    console.print(t2)
            return 1 if any(r["corrupt"] for r in rows) else 0
        # clear
        rows = [dict(tier=t.name, location=_location(t), removed=t.clear()) for t in tiers]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            table = Table(title="KV tiers cleared")
            for col in ("tier", "location", "removed"):
                table.add_column(col)
            for r in rows:
                table.add_row(r["tier"], r["location"], str(r["removed"]))
            console.print(table)
        return 0
    finally:
        for t in tiers:
            t.close()
