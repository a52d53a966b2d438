"""Recall: every message and tool result of every session embedded in the background, and searched.

    recall = Recall(store)            # the index beside the store (memory/index.py), the packaged model
    recall.start()                    # a daemon thread at low CPU priority; catches up at once
    recall.notify()                   # after a write: look for new messages now, not at the next poll
    hits = await recall.search(owner, "where does the user live?", k=5, session_id=None)

The thread reads the store for sessions whose messages are ahead of their embedding cursor, embeds the
new messages (chunked), and writes the chunks with the cursor in one transaction. It never runs on the
engine thread and no request waits for it: a search sees what is indexed so far. Killed at any point,
it loses nothing: the cursor only moves with the rows it covers, so the next start embeds the rest.
The thread runs at nice +10 (Linux: per thread, inherited by torch's worker threads it starts), so the
engine's step loop wins the CPU when both want it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

from kvstrata.memory.embed import Embedder, chunks
from kvstrata.memory.index import Chunk, Hit, MemoryIndex, open_index

log = logging.getLogger(__name__)
NICE = 10


def message_text(m: dict[str, Any]) -> str:
    """The searchable text of a stored message: its content, its tool calls; "" for a tombstone."""
    meta = m.get("kvstrata") if isinstance(m.get("kvstrata"), dict) else {}
    if meta.get("deleted"):
        return ""
    c = m.get("content")
    if isinstance(c, list):
        c = " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
    parts = [c] if isinstance(c, str) and c.strip() else []
    for call in m.get("tool_calls") or ():
        f = call.get("function") or {}
        parts.append(f"called {f.get('name', '')}({f.get('arguments', '')})")
    return "\n".join(parts)


class Recall:
    def __init__(self, store: Any, *, embedder: Embedder | None = None, index: MemoryIndex | None = None,
                 poll_s: float = 2.0, batch_messages: int = 16) -> None:
        self.store = store
        self.embedder = embedder or Embedder()
        self.index = index or open_index(store)
        self.poll_s, self.batch_messages = poll_s, batch_messages
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {"messages": 0, "chunks": 0, "errors": 0, "embed_s": 0.0}

    # -- the background thread --------------------------------------------------------------------
    def start(self) -> "Recall":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvstrata-recall", daemon=True)
            self._thread.start()
        return self

    def notify(self) -> None:
        self._idle.clear()
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.index.close()

    def _loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except (AttributeError, OSError) as e:  # not Linux, or not allowed: run at normal priority
            log.debug("recall thread keeps its priority: %s", e)
        delay = self.poll_s
        while not self._stop.is_set():
            try:
                n = self.run_once()
                delay = self.poll_s
            except Exception as e:  # a store hiccup: retry later, never die
                self.counters["errors"] += 1
                log.warning("recall: embedding failed (%s); retrying in %.0fs", e, delay)
                n, delay = 0, min(60.0, delay * 2)
            if n == 0:
                self._idle.set()
                self._wake.wait(delay)
                self._wake.clear()

    def run_once(self) -> int:
        """Embed one batch of every session that is behind; returns the messages embedded."""
        done_total = 0
        for sid, owner, n, done in self.index.backlog():
            if self._stop.is_set():
                break
            end = min(n, done + self.batch_messages)
            todo: list[Chunk] = []
            for idx, body in self.index.messages(sid, done, end):
                m = json.loads(body)
                for part, text in enumerate(chunks(message_text(m))):
                    todo.append(Chunk(idx, part, str(m.get("role", "")), text))
            t0 = time.perf_counter()
            vecs = self.embedder.encode([c.text for c in todo])
            self.counters["embed_s"] += time.perf_counter() - t0
            if self.index.write(sid, owner, todo, vecs, end):
                self.counters["messages"] += end - done
                self.counters["chunks"] += len(todo)
            done_total += end - done
        return done_total

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Until every session's messages are embedded (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.index.stats()["sessions_behind"] == 0:
                return True
            self.notify()
            time.sleep(0.1)
        return False

    # -- search -----------------------------------------------------------------------------------
    def search_sync(self, owner: Any, query: str, k: int = 5, session_id: str | None = None) -> list[Hit]:
        if not isinstance(query, str) or not query.strip():
            from kvstrata.core import KvstrataError

            raise KvstrataError("memory_search needs a non-empty `query` string")
        k = max(1, min(int(k), 50))
        return self.index.search(owner, self.embedder.encode([query])[0], k, session_id)

    async def search(self, owner: Any, query: str, k: int = 5, session_id: str | None = None) -> list[Hit]:
        """Off the event loop and the engine thread (a worker thread embeds the query and searches)."""
        return await asyncio.to_thread(self.search_sync, owner, query, k, session_id)

    def stats(self) -> dict[str, Any]:
        return {"index": self.index.kind, **self.index.stats(), **{k: round(v, 3) if isinstance(v, float) else v
                                                                    for k, v in self.counters.items()}}
