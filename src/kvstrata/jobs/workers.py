"""Running tool calls: a bounded set of CPU worker threads with a timeout per call, and one agent's tools.

A tool call never raises into the agent loop: an exception, a timeout, bad arguments or output that
is not JSON all come back as an error string that the model reads as the tool's result.

A Python call runs in its own daemon thread, at most `max_workers` at once. A call past its timeout is
abandoned (Python cannot kill a thread): its slot is freed, the agent is told, and the thread ends when
the function returns (counted in `abandoned`, still running or not). A hung tool thus never blocks
the job, though it holds its memory until it returns.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from kvstrata.core import KvstrataError
from kvstrata.jobs.tools import Tool, ToolContext, render_output

log = logging.getLogger(__name__)


@dataclass
class ToolOutcome:
    content: str  # what the model reads
    error: str | None = None
    duration_s: float = 0.0
    state: dict | None = None  # {toolset name: snapshot} after the call (stateful toolsets only)

    def record(self) -> dict:
        """What the session store keeps for the call (its result column)."""
        return {"content": self.content, "duration_s": round(self.duration_s, 6), "state": self.state}


class ToolWorkers:
    def __init__(self, max_workers: int) -> None:
        self.max_workers = max(1, int(max_workers))
        self._sem: asyncio.Semaphore | None = None
        self.stats = {"calls": 0, "errors": 0, "timeouts": 0, "abandoned": 0}
        self.running = 0

    async def run(self, fn: Callable[..., Any], kwargs: dict, timeout_s: float) -> tuple[Any, BaseException | None, float]:
        """(value, exception or None, seconds); a timeout is a TimeoutError exception."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_workers)
        loop = asyncio.get_running_loop()
        async with self._sem:
            fut: asyncio.Future = loop.create_future()

            def done(r) -> None:
                if not fut.done():
                    fut.set_result(r)

            def work() -> None:
                try:
                    r = (fn(**kwargs), None)
                except BaseException as e:  # the tool's own failure, reported to the model
                    r = (None, e)
                try:
                    loop.call_soon_threadsafe(done, r)
                except RuntimeError:  # the loop is gone (job over): nothing to deliver to
                    pass

            t0 = time.perf_counter()
            self.stats["calls"] += 1
            self.running += 1
            threading.Thread(target=work, daemon=True, name=f"kvstrata-tool-{getattr(fn, '__name__', 'fn')}").start()
            try:
                value, exc = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except asyncio.TimeoutError:
                self.stats["timeouts"] += 1
                self.stats["abandoned"] += 1
                return None, TimeoutError(f"no result after {timeout_s:g} s; the call was abandoned"), time.perf_counter() - t0
            finally:
                self.running -= 1
            if exc is not None:
                self.stats["errors"] += 1
            return value, exc, time.perf_counter() - t0


class TaskTools:
    """The tools one agent sees: OpenAI definitions for the prompt, and `call()` to run one."""

    def __init__(self, registry: dict[str, Tool], task, max_output_chars: int = 8000) -> None:
        self.task = task
        self.max_output_chars = max_output_chars
        chosen: list[tuple[Tool, dict]] = []
        if task.tools == "*":
            chosen = [(t, t.openai()) for t in registry.values() if not t.source.startswith("builtin:")]  # named only
        else:
            for i, item in enumerate(task.tools):
                name = item if isinstance(item, str) else ((item.get("function") or {}).get("name") or item.get("name"))
                t = registry.get(name) if isinstance(name, str) else None
                if t is None:
                    raise KvstrataError(f"task {task.id!r}: tools[{i}] names {name!r}, which no tool source provides; "
                                        f"known tools: {sorted(registry)[:30]}")
                if isinstance(item, str):
                    chosen.append((t, t.openai()))
                else:  # the job file's own description / schema of a registered tool
                    f = item.get("function") if "function" in item else item
                    chosen.append((t, {"type": "function", "function": {
                        "name": t.name, "description": f.get("description", t.description),
                        "parameters": f.get("parameters") or t.parameters}}))
        self.tools = {t.name: t for t, _ in chosen}
        self.defs = [d for _, d in chosen]
        self._instances: dict[type, Any] = {}
        self._locks: dict[type, asyncio.Lock] = {}
        self._restored: dict[str, Any] = {}

    def restore(self, snapshots: dict[str, Any]) -> None:
        """Toolset states as the last recorded calls left them (before any toolset is built)."""
        self._restored.update(snapshots)

    def _instance(self, cls: type) -> Any:
        inst = self._instances.get(cls)
        if inst is None:
            name = cls.toolset_name()
            state = self._restored[name] if name in self._restored else self.task.tool_state.get(name)
            inst = self._instances[cls] = cls(state)
        return inst

    async def call(self, name: str, arguments: Any, ctx: ToolContext, workers: ToolWorkers,
                   timeout_s: float) -> ToolOutcome:
        t = self.tools.get(name)
        if t is None:
            err = f"unknown tool {name!r}; the tools you can call are: {', '.join(sorted(self.tools)) or 'none'}"
            return ToolOutcome(f"Error: {err}", err)
        try:
            args = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as e:
            args = e
        if not isinstance(args, dict):
            err = f"the arguments of {name} must be a JSON object; got {str(arguments)[:200]!r}"
            return ToolOutcome(f"Error: {err}", err)
        if t.mcp is not None:
            t0 = time.perf_counter()
            content, err = await t.mcp.call(t.mcp_name, args, timeout_s, self.max_output_chars)
            return ToolOutcome(content, err, time.perf_counter() - t0)
        lock = None
        if t.toolset is not None:
            try:
                fn = getattr(self._instance(t.toolset), t.method)
            except Exception as e:  # a toolset whose state does not load: the model is told
                err = f"the toolset {t.toolset.toolset_name()} failed to start: {type(e).__name__}: {e}"
                return ToolOutcome(f"Error: {err}", err)
            lock = self._locks.setdefault(t.toolset, asyncio.Lock())
        else:
            fn = t.fn
        kwargs = dict(args)
        if t.ctx_param:
            kwargs[t.ctx_param] = ctx
        try:
            inspect.signature(fn).bind(**kwargs)
        except TypeError as e:
            err = f"bad arguments for {name}: {e}"
            return ToolOutcome(f"Error: {err}", err)
        if lock is not None:
            async with lock:
                value, exc, dt = await workers.run(fn, kwargs, timeout_s)
                state = None
                if exc is None or not isinstance(exc, TimeoutError):
                    try:
                        state = {t.toolset.toolset_name(): self._instances[t.toolset].snapshot()}
                    except Exception as e:  # pragma: no cover - a broken snapshot(): keep the old state
                        log.warning("snapshot of toolset %s failed: %s", t.toolset.toolset_name(), e)
        else:
            value, exc, dt = await workers.run(fn, kwargs, timeout_s)
            state = None
        if exc is not None:
            err = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TimeoutError) else f"timeout: {exc}"
            return ToolOutcome(f"Error: {name} failed: {err}", err, dt, state)
        content, err = render_output(value, self.max_output_chars)
        return ToolOutcome(content, err, dt, state)
