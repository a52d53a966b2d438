"""A tiny MCP server over stdio for the jobs tests: `add` and `fail`. Works with mcp 1.x (FastMCP) and
2.x (MCPServer)."""

from __future__ import annotations

try:
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as MCPServer
    from mcp.server.fastmcp.exceptions import ToolError

server = MCPServer("kvstrata-test")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return f"sum={a + b}"


@server.tool()
def fail() -> str:
    """Always fails."""
    raise ToolError("the MCP tool failed on purpose")


if __name__ == "__main__":
    server.run()
