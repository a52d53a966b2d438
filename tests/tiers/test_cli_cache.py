"""`kvstrata cache stats | verify | clear` on a real disk directory and a real Redis."""

from __future__ import annotations

import json

from kvstrata.cli.main import main
from kvstrata.tiers.disk import DiskTier
from kvstrata.tiers.remote import RedisTier
from tests.tiers.blocks import BLOB_BYTES, FP, make_block


def run_json(capsys, *argv) -> tuple[int, object]:
    code = main(["cache", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def fill(tmp_path, redis_url, n=4):
    d = DiskTier(tmp_path)
    r = RedisTier(redis_url, prefix="cli-test:")
    blocks = [make_block(i) for i in range(n)]
    for b in blocks:
        d.put(b.key, b.blob())
        r.put(b.key, b.blob("int8"))
    return d, r, blocks


def test_stats_counts_blocks_models_and_codecs(tmp_path, redis_server, capsys):
    d, r, blocks = fill(tmp_path, redis_server.url)
    code, rows = run_json(capsys, "stats", "--kv-disk-dir", str(tmp_path), "--kv-redis-url", redis_server.url,
                          "--kv-redis-prefix", "cli-test:")
    assert code == 0
    disk, remote = rows
    assert (disk["tier"], disk["blocks"], disk["bytes"]) == ("disk", 4, 4 * BLOB_BYTES)
    assert disk["models"] == {FP[:16]: 4} and disk["codecs"] == {"raw": 4} and disk["dtypes"] == {"float32": 4}
    assert (remote["blocks"], remote["codecs"]) == (4, {"int8": 4})
    r.clear()
    assert main(["cache", "stats", "--kv-disk-dir", str(tmp_path)]) == 0
    assert "KV tiers" in capsys.readouterr().out


def test_verify_reports_and_removes_corrupt_blocks(tmp_path, redis_server, capsys):
    d, r, blocks = fill(tmp_path, redis_server.url)
    p = d.path(blocks[1].key)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0x80
    p.write_bytes(bytes(raw))
    misnamed = d.path(blocks[3].key)  # a whole, valid block under another block's name
    misnamed.write_bytes(blocks[2].blob())
    r.put(make_block(9).key, blocks[0].blob()[:-5])  # truncated value in Redis

    code, rows = run_json(capsys, "verify", "--dry-run", "--kv-disk-dir", str(tmp_path),
                          "--kv-redis-url", redis_server.url, "--kv-redis-prefix", "cli-test:")
    assert code == 1
    disk, remote = rows
    assert sorted((c["key"], c["reason"]) for c in disk["corrupt"]) == sorted(
        [(blocks[1].key.hex(), "checksum"), (blocks[3].key.hex(), "key")])
    assert [(c["key"], c["reason"]) for c in remote["corrupt"]] == [(make_block(9).key.hex(), "truncated")]
    assert p.exists() and disk["removed"] == 0

    assert main(["cache", "verify", "--kv-disk-dir", str(tmp_path), "--kv-redis-url", redis_server.url,
                 "--kv-redis-prefix", "cli-test:"]) == 1
    out = capsys.readouterr().out
    assert "corrupt blocks" in out and "checksum" in out
    assert not p.exists() and not misnamed.exists()
    assert r.get(make_block(9).key) is None

    code, rows = run_json(capsys, "verify", "--kv-disk-dir", str(tmp_path), "--kv-redis-url", redis_server.url,
                          "--kv-redis-prefix", "cli-test:")
    assert code == 0 and [x["checked"] for x in rows] == [2, 4]
    r.clear()


def test_clear_empties_only_the_named_namespace(tmp_path, redis_server, capsys):
    d, r, blocks = fill(tmp_path, redis_server.url)
    other = RedisTier(redis_server.url, prefix="cli-other:")
    other.put(blocks[0].key, blocks[0].blob())
    code, rows = run_json(capsys, "clear", "--kv-disk-dir", str(tmp_path), "--kv-redis-url", redis_server.url,
                          "--kv-redis-prefix", "cli-test:")
    assert code == 0 and [x["removed"] for x in rows] == [4, 4]
    assert list(tmp_path.rglob("*.kvb")) == [] and list(r.keys()) == []
    assert other.get(blocks[0].key) is not None
    other.clear()


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["cache", "stats"]) == 2
    assert "--kv-disk-dir" in capsys.readouterr().err
    assert main(["cache", "stats", "--kv-disk-dir", str(tmp_path / "missing")]) == 2
    from tests.support.redis_server import free_port

    assert main(["cache", "stats", "--kv-redis-url", f"redis://127.0.0.1:{free_port()}/0"]) == 2
    assert "cannot reach Redis" in capsys.readouterr().err
