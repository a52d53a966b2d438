"""The KV tiers' figures (as `kvstrata cache stats` shows them) are Prometheus metrics too."""

from __future__ import annotations

import httpx

from tests.server.harness import make_engine, serve


def _metric(text: str, prefix: str) -> float:
    line = next(l for l in text.splitlines() if l.startswith(prefix))
    return float(line.split()[-1])


def test_tier_metrics_after_a_park(tiny_llama, tmp_path):
    from kvstrata.sessions import open_store

    ae = make_engine(str(tiny_llama), kv_disk_dir=str(tmp_path / "kv"))
    store = open_store(tmp_path / "s.db")
    try:
        with serve(ae, store) as srv:
            client = srv.client()
            msgs = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
            ids = ae.tokenizer.encode_chat(msgs)
            parked = ae.call(lambda e: e.offload.park(ids, "disk")).result(30)
            assert parked["blocks_written"] + parked["blocks_already_there"] == len(ids) // 16
            assert ae.engine.offload.stack.flush(30)  # the reply's blocks, written behind by the mover
            on_disk = len(list(ae.engine.offload.stack.tiers[0].keys()))
            assert on_disk >= len(ids) // 16
            text = httpx.get(srv.url + "/metrics").text
            assert _metric(text, 'kvstrata_kv_tier{stat="bytes_written",tier="disk"}') > 0
            assert _metric(text, 'kvstrata_kv_tier{stat="blocks",tier="disk"}') == on_disk
    finally:
        ae.shutdown()
        store.close()
