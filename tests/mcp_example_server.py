"""A small stdio MCP server for tests/test_tools_mcp.py, written with the official SDK (mcp 2.x MCPServer).

Run as `python tests/mcp_example_server.py`; it serves until its stdin closes. With --linger it then stays on for
a minute, as a server that ignores the end of its stdin would (only a signal stops it); --no-tools serves none."""

import sys
import time

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("example")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def calculator(expression: str) -> str:
    """Evaluate a sum of integers such as '19 + 24' (for the end-to-end tool test: the policy calls it by this name)."""
    return str(sum(int(part) for part in expression.split("+")))


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def fail() -> str:
    """Always fails."""
    raise ToolError("this tool always fails")


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep for the given seconds, then say so."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


if __name__ == "__main__":
    (MCPServer("empty") if "--no-tools" in sys.argv else server).run("stdio")
    if "--linger" in sys.argv:
        time.sleep(60)
