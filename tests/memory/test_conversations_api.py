"""The Conversations API, responses with `conversation`, input_items and DELETE /v1/responses, driven by
the unchanged `openai` client against SQLite and a real PostgreSQL; another API key sees none of it."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.memory.conftest import KEY_A, KEY_B, memory_server


def _texts(items) -> list[str]:
    out = []
    for i in items:
        if i.type == "message":
            out.append("".join(c.text for c in i.content))
    return out


def test_conversations_crud_items_and_responses(short_engine, store_url):
    with memory_server(short_engine, store_url) as srv:
        a, b = srv.client(KEY_A), srv.client(KEY_B)
        conv = a.conversations.create(items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
                                      metadata={"topic": "intro"})
        assert conv.object == "conversation" and conv.metadata == {"topic": "intro"}
        assert a.conversations.retrieve(conv.id).id == conv.id
        assert a.conversations.update(conv.id, metadata={"topic": "renamed"}).metadata == {"topic": "renamed"}

        added = a.conversations.items.create(conv.id, items=[
            {"type": "message", "role": "user", "content": "I live in Lyon."}])
        assert [i.id for i in added.data] == ["item_1"]
        got = a.conversations.items.retrieve("item_1", conversation_id=conv.id)
        assert got.type == "message" and got.content[0].text == "I live in Lyon."

        r1 = a.responses.create(model="tiny", input="Say something.", conversation=conv.id, max_output_tokens=8,
                                temperature=0)
        assert r1.status in ("completed", "incomplete") and r1.output
        items = list(a.conversations.items.list(conv.id, order="asc"))
        assert _texts(items)[:3] == ["My name is Ada.", "I live in Lyon.", "Say something."]
        assert items[3].type == "message" and items[3].role == "assistant"

        ins = list(a.responses.input_items.list(r1.id))
        assert _texts(ins) == ["Say something."]

        r2 = a.responses.create(model="tiny", input=[{"role": "user", "content": "And now?"}], conversation={"id": conv.id},
                                max_output_tokens=8, temperature=0)
        # the conversation's earlier turns are its prompt's prefix, served from the cache
        assert r2.usage.input_tokens_details.cached_tokens >= 32
        assert r2.usage.input_tokens > r1.usage.input_tokens
        assert len(list(a.conversations.items.list(conv.id))) == 6

        # an item deleted leaves the conversation (and the next prompt)
        a.conversations.items.delete("item_1", conversation_id=conv.id)
        assert "I live in Lyon." not in _texts(a.conversations.items.list(conv.id, order="asc"))
        with pytest.raises(openai.NotFoundError):
            a.conversations.items.retrieve("item_1", conversation_id=conv.id)
        r3 = a.responses.create(model="tiny", input="Again.", conversation=conv.id, max_output_tokens=4, temperature=0)
        assert r3.usage.input_tokens < r2.usage.input_tokens + 40  # the deleted text is no longer rendered

        # another key: nothing of it exists
        with pytest.raises(openai.NotFoundError):
            b.conversations.retrieve(conv.id)
        with pytest.raises(openai.NotFoundError):
            b.conversations.items.list(conv.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(r1.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.input_items.list(r1.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.create(model="tiny", input="hi", conversation=conv.id, max_output_tokens=4)
        with pytest.raises(openai.NotFoundError):
            b.responses.delete(r1.id)

        # DELETE /v1/responses/{id}: gone, its conversation stays
        a.responses.delete(r1.id)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(r1.id)
        assert a.conversations.retrieve(conv.id).id == conv.id
        assert a.responses.retrieve(r2.id).id == r2.id

        deleted = a.conversations.delete(conv.id)
        assert deleted.deleted and deleted.id == conv.id
        with pytest.raises(openai.NotFoundError):
            a.conversations.retrieve(conv.id)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(r2.id)  # its responses went with it


def test_conversation_bad_input_is_400_and_changes_nothing(short_engine, tmp_path):
    with memory_server(short_engine, str(tmp_path / "s.db")) as srv:
        a = srv.client(KEY_A)
        conv = a.conversations.create()
        h = {"Authorization": f"Bearer {KEY_A}"}
        bad = [
            ("post", f"/v1/conversations/{conv.id}/items", {"items": [{"type": "message", "role": "wizard", "content": "x"}]}),
            ("post", f"/v1/conversations/{conv.id}/items", {"items": []}),
            ("post", "/v1/conversations", {"metadata": {f"k{i}": "v" for i in range(17)}}),
            ("post", "/v1/responses", {"model": "tiny", "input": "x", "conversation": conv.id, "previous_response_id": "resp_x"}),
            ("post", "/v1/responses", {"model": "tiny", "input": "x", "conversation": conv.id,
                                       "context_management": [{"type": "compaction", "compact_threshold": -3}]}),
        ]
        for method, path, body in bad:
            r = getattr(httpx, method)(srv.url + path, json=body, headers=h, timeout=60)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["message"]
        assert list(a.conversations.items.list(conv.id)) == []
        r = httpx.get(f"{srv.url}/v1/conversations/{conv.id}/items/item_99", headers=h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "item_not_found"


def test_retention_sweep_keeps_the_newest_per_key(short_engine, tmp_path):
    import time

    with memory_server(short_engine, str(tmp_path / "s.db"), max_sessions_per_owner=2, sweep_every_s=0.2) as srv:
        a, b = srv.client(KEY_A), srv.client(KEY_B)
        ids = []
        for _ in range(4):
            ids.append(a.conversations.create().id)
            time.sleep(0.01)
        kept_b = b.conversations.create().id
        deadline = time.time() + 20
        while time.time() < deadline and srv.state.memory.sweeps["sessions"] < 2:
            time.sleep(0.1)
        assert srv.state.memory.sweeps["sessions"] == 2
        for cid in ids[:2]:
            with pytest.raises(openai.NotFoundError):
                a.conversations.retrieve(cid)
        assert [a.conversations.retrieve(c).id for c in ids[2:]] == ids[2:]
        assert b.conversations.retrieve(kept_b).id == kept_b
