"""The engine behind a server: one thread owns the LLMEngine and steps it; asyncio callers stream.

Everything that touches the engine runs on its thread (requests are added and aborted between steps,
`call()` runs any function there), so the engine itself needs no locks.

Give it a factory (`AsyncEngine(lambda: LLMEngine(cfg))`) and the engine is also *built* on that
thread, so one thread does all of the model's tensor work. PyTorch's CPU ops run on GNU OpenMP, which
keeps a team of worker threads per calling thread; once the teams together hold more threads than the
machine has CPUs (a model loaded on the main thread and stepped on this one: 4 on 2 cores), libgomp
stops spinning at its barriers and sleeps in futexes instead, and every op pays for a wake-up. Measured
on the 2-core machine, a 64-request wave of the default model: 10.6-12.3 s stepped on the thread that
built the engine, 13.9-17.5 s on another (160,000 context switches against 100).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Sequence as Seq

from kvstrata.core import KvstrataError, RequestClass, RequestOutput, SamplingParams
from kvstrata.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


class QueueFullError(KvstrataError):
    """More requests are waiting than the server accepts; retry later (HTTP 429)."""


class EngineDeadError(KvstrataError):
    """The engine thread stopped after an internal error; the server must be restarted."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int = 256) -> None:
        factory = None if isinstance(engine, LLMEngine) else engine
        self.engine: LLMEngine = None if factory else engine  # type: ignore[assignment]
        self.max_waiting = max_waiting
        self._cmds: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._dead: BaseException | None = None
        self._ids = 0
        built = threading.Event()
        build_error: list[BaseException] = []

        def main() -> None:
            if factory is not None:
                try:
                    self.engine = factory()
                except BaseException as e:  # re-raised in the constructor's thread
                    build_error.append(e)
                    return
                finally:
                    built.set()
            self._loop()

        self._thread = threading.Thread(target=main, name="kvstrata-engine", daemon=True)
        self._thread.start()
        if factory is not None:
            built.wait()
            if build_error:
                self._thread.join()
                raise build_error[0]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # -- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        failures = 0
        try:
            while not self._stop:
                while True:
                    try:
                        self._cmds.get_nowait()()
                    except queue.Empty:
                        break
                if self.engine.has_unfinished():
                    try:
                        outs = self.engine.step()
                        failures = 0
                    except Exception as e:  # fail the requests in flight, keep serving the next ones
                        failures += 1
                        if failures >= 3:
                            raise
                        log.exception("engine step failed; aborting the requests in flight")
                        self._fail_in_flight(e)
                        continue
                    for out in outs:
                        self._deliver(out.request_id, out)
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # repeated internal errors: fail every stream loudly, never hang them
            log.exception("engine thread died")
            self._dead = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"the engine stopped: {e!r}"))

    def _fail_in_flight(self, err: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
            self._deliver(rid, KvstrataError(f"the engine step failed and this request was aborted: {err!r}"))

    def _deliver(self, rid: str, item: Any) -> None:
        entry = self._streams.get(rid)
        if entry is None:
            return
        loop, q = entry
        if isinstance(item, BaseException) or getattr(item, "finished", False):
            self._streams.pop(rid, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _submit(self, fn: Callable[[], None]) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")
        self._cmds.put(fn)
        self._wake.set()

    # -- API --------------------------------------------------------------------------------------
    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Runs fn(engine) on the engine thread between steps; returns a concurrent Future."""
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:
                fut.set_exception(e)

        self._submit(run)
        return fut

    async def call_async(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    async def generate(
        self,
        prompt: str | Seq[int],
        params: SamplingParams,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.INTERACTIVE,
    ) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutputs (cumulative) until finished. Cancelling the iterator aborts the request."""
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"{self.num_waiting} requests are already waiting; retry later")
        self._ids += 1
        rid = request_id or f"areq-{self._ids}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()

        def add() -> None:
            try:
                self.engine.add_request(prompt, params, rid, request_class)
                self._streams[rid] = (loop, q)
                loop.call_soon_threadsafe(added.set_result, None)
            except BaseException as e:
                loop.call_soon_threadsafe(added.set_exception, e)

        self._submit(add)
        await added  # validation errors (too long, bad ids) surface here, before any output
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        def run() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        if self._dead is None:
            self._submit(run)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
