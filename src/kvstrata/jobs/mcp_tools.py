"""Tools from MCP servers over stdio (the `mcp` package, imported only here).

Each server in a job's `mcp_servers` is started once per job run and kept for the run: one asyncio
task holds the stdio transport and the client session open (anyio scopes must be entered and left in
the same task), lists the server's tools, and closes both when the job ends. Calls from any agent go
through that session, each under the task's tool timeout; a server that died or timed out gives the
model an error result, never an exception.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from typing import Any

from kvstrata.core import KvstrataError
from kvstrata.jobs.spec import MCPServerSpec
from kvstrata.jobs.tools import Tool, render_output

log = logging.getLogger(__name__)


def _attr(obj: Any, *names: str, default: Any = None) -> Any:
    """mcp 1.x uses camelCase fields (inputSchema, isError), 2.x snake_case: read either."""
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


class MCPConnection:
    def __init__(self, spec: MCPServerSpec) -> None:
        self.spec = spec
        self.session: Any = None
        self.tools: list[Tool] = []
        self._ready: asyncio.Future | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.dead: str | None = None
        self.errlog_path: str | None = None

    async def start(self) -> list[Tool]:
        try:
            import mcp  # noqa: F401
        except ImportError:
            raise KvstrataError("the job lists MCP servers but the `mcp` package is not installed: pip install mcp") from None
        loop = asyncio.get_running_loop()
        self._ready, self._stop = loop.create_future(), asyncio.Event()
        self._task = asyncio.create_task(self._hold(), name=f"mcp-{self.spec.name}")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.spec.startup_timeout_s)
        except asyncio.TimeoutError:
            await self.close()
            raise KvstrataError(f"MCP server {self.spec.name!r} ({self.spec.command}) did not answer within "
                                f"{self.spec.startup_timeout_s:g} s; check the command and its arguments") from None
        except KvstrataError:
            await self.close()
            raise
        return self.tools

    async def _hold(self) -> None:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        s = self.spec
        params = StdioServerParameters(command=s.command, args=list(s.args), env=dict(s.env) or None, cwd=s.cwd)
        # the server's stderr goes to a log file, not over the progress display
        errlog = tempfile.NamedTemporaryFile("w", prefix=f"kvstrata-mcp-{s.name}-", suffix=".log", delete=False)
        self.errlog_path = errlog.name
        try:
            async with stdio_client(params, errlog=errlog) as streams:
                read, write = streams[0], streams[1]
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    listed = await session.list_tools()
                    self.session = session
                    for t in listed.tools:
                        schema = _attr(t, "input_schema", "inputSchema") or {"type": "object", "properties": {}}
                        self.tools.append(Tool(name=s.tool_prefix + t.name, description=t.description or t.name,
                                               parameters=dict(schema), source=f"mcp:{s.name}", mcp=self,
                                               mcp_name=t.name))
                    if not self._ready.done():
                        self._ready.set_result(None)
                    await self._stop.wait()
        except Exception as e:
            self.dead = f"{type(e).__name__}: {e}"
            log.warning("MCP server %s stopped: %s", s.name, self.dead)
            if not self._ready.done():
                self._ready.set_exception(KvstrataError(
                    f"MCP server {s.name!r} ({s.command} {' '.join(s.args)}) failed to start: {self.dead} "
                    f"(its stderr: {self.errlog_path})"))
        finally:
            self.session = None
            errlog.close()

    async def call(self, name: str, args: dict, timeout_s: float, max_chars: int) -> tuple[str, str | None]:
        """(content for the model, error or None)."""
        if self.session is None:
            err = f"the MCP server {self.spec.name!r} is not running ({self.dead or 'stopped'})"
            return f"Error: {err}", err
        try:
            res = await asyncio.wait_for(self.session.call_tool(name, args), timeout_s)
        except asyncio.TimeoutError:
            err = f"timeout: no result from MCP server {self.spec.name!r} after {timeout_s:g} s"
            return f"Error: {err}", err
        except Exception as e:  # protocol errors, a dead server
            err = f"MCP call failed: {type(e).__name__}: {e}"
            return f"Error: {err}", err
        parts = []
        for c in _attr(res, "content", default=[]) or []:
            text = _attr(c, "text")
            parts.append(text if isinstance(text, str) else f"[{_attr(c, 'type', default='content')} omitted]")
        structured = _attr(res, "structured_content", "structuredContent")
        body = "\n".join(parts) if parts else (structured if structured is not None else "")
        content, err = render_output(body, max_chars)
        if _attr(res, "is_error", "isError", default=False):
            err = content
            content = f"Error: {content}"
        return content, err

    async def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 15)
            except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - closing must not raise
                log.warning("MCP server %s did not close cleanly: %r", self.spec.name, e)
                self._task.cancel()
            self._task = None
