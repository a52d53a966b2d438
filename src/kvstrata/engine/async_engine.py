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


class _Command:
    """One unit of work for the engine thread: `run()` there between steps, or `fail(err)` when the engine
    stops before running it (its caller then gets the error instead of waiting forever)."""

    __slots__ = ("run", "fail")

    def __init__(self, run: Callable[[], None], fail: Callable[[BaseException], None]) -> None:
        self.run, self.fail = run, fail


def _settle(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolves an asyncio future unless its caller already left (cancelled): runs on the future's loop."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class AsyncEngine:
    """Cancellation contract: a caller may be cancelled at any await point. A `call()` cancelled before
    the engine thread reaches it never runs; one already running finishes and its result is dropped. A
    `generate()` cancelled at any point leaves no request behind (an add still queued is undone right
    after it runs). Nothing a caller does reaches the engine loop as an error. When the engine stops (an
    internal error, or `shutdown()`), every queued command and every open stream gets EngineDeadError."""

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int = 256) -> None:
        factory = None if isinstance(engine, LLMEngine) else engine
        self.engine: LLMEngine = None if factory else engine  # type: ignore[assignment]
        self.max_waiting = max_waiting
        self._cmds: queue.Queue[_Command] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._dead: BaseException | None = None  # set when the engine thread died of an internal error
        self._closed: str | None = None  # why no command is accepted any more (died or shut down)
        self._lock = threading.Lock()  # orders _submit against the loop's final drain
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
        reason = "the engine was shut down"
        try:
            while not self._stop:
                self._run_commands()
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
            reason = f"the engine stopped: {e!r}"
        self._close(reason)

    def _run_commands(self) -> None:
        while not self._stop:  # after shutdown() the rest fail in _close instead of running
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            try:
                cmd.run()
            except Exception:  # a command's own failure goes to its caller; never let one stop the loop
                log.exception("an engine command failed outside its caller's future")

    def _close(self, reason: str) -> None:
        """No command is accepted from now on; every queued command and open stream fails with `reason`."""
        with self._lock:
            self._closed = reason
        err = EngineDeadError(reason)
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            try:
                cmd.fail(err)
            except Exception:
                log.exception("failing a queued engine command")
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError(reason))

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

    def _submit(self, run: Callable[[], None], fail: Callable[[BaseException], None]) -> None:
        with self._lock:
            if self._closed is not None:
                raise EngineDeadError(self._closed)
            self._cmds.put(_Command(run, fail))
        self._wake.set()

    # -- API --------------------------------------------------------------------------------------
    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Runs fn(engine) on the engine thread between steps; returns a concurrent Future. Cancelling the
        Future before the engine thread reaches it means fn never runs."""
        fut: Future = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():  # the caller left before it ran: skip it
                return
            try:
                result = fn(self.engine)
            except BaseException as e:
                fut.set_exception(e)
            else:
                fut.set_result(result)

        def fail(err: BaseException) -> None:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)

        self._submit(run, fail)
        return fut

    async def call_async(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    async def generate(
        self,
        prompt: str | Seq[int],
        params: SamplingParams,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.INTERACTIVE,
        program: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutputs (cumulative) until finished. Cancelling the iterator, at any point, aborts
        the request. `program`: the agent program (session, job task) it belongs to (LLMEngine.add_request)."""
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"{self.num_waiting} requests are already waiting; retry later")
        self._ids += 1
        rid = request_id or f"areq-{self._ids}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()

        def settle(result: Any = None, error: BaseException | None = None) -> None:
            try:
                loop.call_soon_threadsafe(_settle, added, result, error)
            except RuntimeError:  # the caller's loop is closed: nobody waits for this
                pass

        mine: list = []  # on the engine thread: this call's request object, once add() put it there

        def add() -> None:
            try:
                self.engine.add_request(prompt, params, rid, request_class, program=program)
            except Exception as e:
                settle(error=e)
                return
            mine.append(self.engine.requests[rid])
            self._streams[rid] = (loop, q)
            settle()

        def undo() -> None:  # runs after add() (commands run in order); removes only what add() put there
            if self._streams.get(rid, (None, None))[1] is q:
                del self._streams[rid]
            if mine and self.engine.requests.get(rid) is mine[0]:  # not a later request reusing the id
                self.engine.abort_request(rid)

        self._submit(add, lambda err: settle(error=err))
        finished = False
        try:
            await added  # validation errors (too long, bad ids) surface here, before any output
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # cancelled or closed at any point, the add still queued included
                try:
                    self._submit(undo, lambda err: None)
                except EngineDeadError:
                    pass

    def abort(self, request_id: str) -> None:
        def run() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        try:
            self._submit(run, lambda err: None)
        except EngineDeadError:  # nothing runs any more: nothing to abort
            self._streams.pop(request_id, None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine thread; queued commands and open streams get EngineDeadError."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
