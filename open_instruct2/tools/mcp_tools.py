"""Tools of an MCP server (--mcp_server_command), through the official mcp SDK (2.x) over stdio.

Threading: the SDK is async, the rollout loop is not. `mcp_tools` starts one daemon thread running one asyncio loop
whose single owner task (`_Server._main`) enters the SDK's `stdio_client` (it spawns the server) and a
`ClientSession`, does the handshake and the listing, then sleeps inside both for the whole run. `Tool.run` (any
thread, several at once) submits `session.call_tool` to that loop with `run_coroutine_threadsafe` and waits at most
timeout_s; a call past it is cancelled (the SDK tells the server) and raises ToolTimeout. `close`, shared by all the
tools, idempotent and registered with atexit, cancels the owner's cancel scope, so the contexts unwind in the task that
entered them: the SDK closes the server's stdin, waits 2 s, then SIGTERMs and SIGKILLs its process group; should that
not finish within CLOSE_TIMEOUT_S, close SIGKILLs the group itself. Start-up failures raise UserError (one line)
only once the child is gone.

Logs: the server's stderr goes to `log_path` (the SDK's errlog=), else to a temp file, removed at close when empty;
the SDK's own log records (a traceback per non-JSON stdout line) go there too, as one line each, not to our stderr.

Secrets: the command line is split with shlex and run as is. The SDK does not pass our environment on: the child
gets only HOME, LOGNAME, PATH, SHELL, TERM and USER (mcp.client.stdio.DEFAULT_INHERITED_ENV_VARS), so keys in our
environment never reach it. A server that needs a secret should read it itself (from a file, or a wrapper script that
exports it): --mcp_server_command is saved with the run's config like every flag, so never write a key into it.
"""

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import logging
import os
import shlex
import signal
import tempfile
import threading

import anyio
import mcp_types
import psutil
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from ..errors import UserError
from .base import Tool, ToolError, ToolTimeout

STARTUP_TIMEOUT_S = 30.0
"""Seconds the server has to complete the MCP handshake and list its tools."""
CLOSE_TIMEOUT_S = 8.0
"""Seconds close waits for the SDK's shutdown (2 s after stdin closes, then SIGTERM, 2 s, SIGKILL) before killing."""
SDK_TAG = "[mcp client]"
"""Marks the SDK's own log records in the server log (the rest is the server's stderr)."""


def _root(e: BaseException) -> BaseException:
    """The single exception inside (nested) anyio exception groups."""
    while len(getattr(e, "exceptions", ())) == 1:
        e = e.exceptions[0]
    return e


def _spawned_leader(before: set[int]) -> int | None:
    """The child started since `before` that leads its own process group (the SDK's start_new_session=True)."""
    for child in psutil.Process().children():
        try:
            if child.pid not in before and os.getpgid(child.pid) == child.pid:
                return child.pid
        except (ProcessLookupError, psutil.Error):
            continue
    return None


class _OneLine(logging.Formatter):
    """An SDK record as one line tagged SDK_TAG (its exception as type and first line, no traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        extra = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc else ""
        return f"{SDK_TAG} {record.levelname} {record.name}: {record.getMessage()}{extra}"


def _route_sdk_logs(handler: logging.Handler, on: bool) -> None:
    """Send the SDK's log records (e.g. a traceback per unparsable stdout line) to the server logs while any is open."""
    sdk = logging.getLogger("mcp")
    (sdk.addHandler if on else sdk.removeHandler)(handler)
    sdk.propagate = not any(getattr(h, "mcp_server_log", False) for h in sdk.handlers)


def _text(result: mcp_types.CallToolResult) -> str:
    """The result's text content items joined by newlines (else its structured content as JSON; images are dropped)."""
    text = "\n".join(item.text for item in result.content if isinstance(item, mcp_types.TextContent))
    return text if text or result.structured_content is None else json.dumps(result.structured_content)


class _Server:
    """One MCP server process and the event-loop thread that owns its session."""

    def __init__(self, argv: list[str], startup_timeout_s: float, log_path: str | None):
        self.argv, self.command, self.startup_timeout_s = argv, shlex.join(argv), startup_timeout_s
        self.temp_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="mcp_server_", suffix=".log")
            os.close(fd)
        self.log_path, self.log = log_path, open(log_path, "a", encoding="utf-8")
        self.sdk_log = logging.StreamHandler(self.log)
        self.sdk_log.setFormatter(_OneLine())
        self.sdk_log.mcp_server_log = True
        self.bad_output: Exception | None = None
        self.ready: concurrent.futures.Future = concurrent.futures.Future()
        self.started, self.lock, self.closed = threading.Event(), threading.RLock(), False
        self.loop = self.scope = self.session = self.pid = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="mcp-client", daemon=True)

    async def _main(self) -> None:
        """Owner task: spawn, handshake, list the tools, then hold the session until close cancels the scope."""
        try:
            with anyio.CancelScope() as self.scope:
                self.loop = asyncio.get_running_loop()
                self.started.set()
                before = {p.pid for p in psutil.Process().children()}
                params = StdioServerParameters(command=self.argv[0], args=self.argv[1:])
                async with stdio_client(params, errlog=self.log) as (read, write):
                    self.pid = _spawned_leader(before)
                    async with ClientSession(read, write, message_handler=self._on_message) as session:
                        with anyio.fail_after(self.startup_timeout_s):
                            await session.initialize()
                            tools = await self._list(session)
                        self.session = session
                        self.ready.set_result(tools)
                        await anyio.sleep_forever()
        except BaseException as e:  # noqa: BLE001 - everything goes to the caller, nothing to stderr
            if not self.ready.done():
                self.ready.set_exception(_root(e))
        finally:
            self.started.set()
            if not self.ready.done():
                self.ready.set_exception(RuntimeError("closed during start-up"))

    async def _on_message(self, message) -> None:
        """Remember the first transport error (a stdout line that is not JSON-RPC) for the start-up message."""
        if isinstance(message, Exception) and self.bad_output is None:
            self.bad_output = message

    @staticmethod
    async def _list(session: ClientSession) -> list[mcp_types.Tool]:
        """All pages of tools/list."""
        tools, cursor = [], None
        while True:
            page = await session.list_tools(params=mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            tools += page.tools
            if not (cursor := page.next_cursor):
                return tools

    def start(self) -> list[mcp_types.Tool]:
        """Start the thread and wait for the listing; UserError (after the child is gone) when that fails."""
        _route_sdk_logs(self.sdk_log, True)
        self.thread.start()
        self.started.wait()
        try:
            tools = self.ready.result(self.startup_timeout_s + CLOSE_TIMEOUT_S)
        except Exception as e:
            message = self._startup_message(e)
            self.close()
            raise UserError(message) from None
        except BaseException:  # a signal (signals.Stopped, KeyboardInterrupt) while waiting: stop the server, go on
            self.close()
            raise
        if not tools:
            self.close()
            raise UserError(f"--mcp_server_command {self.command}: the server lists no tools")
        return tools

    def _startup_message(self, e: BaseException) -> str:
        """One line naming the command and what went wrong."""
        head = f"--mcp_server_command {self.command}"
        if isinstance(e, OSError) and not isinstance(e, TimeoutError):  # the spawn failed
            problem = {FileNotFoundError: "not found", PermissionError: "is not executable"}.get(type(e), f"cannot start ({e})")
            return f"{head}: program {self.argv[0]!r} {problem}"
        if isinstance(e, TimeoutError):
            problem = f"no MCP handshake within the start-up timeout of {self.startup_timeout_s:g} s (is it an MCP stdio server?)"
            if self.bad_output is not None:
                problem += "; its stdout is not MCP JSON-RPC"
        elif isinstance(e, MCPError) and e.code == mcp_types.CONNECTION_CLOSED:
            problem = "it exited (or closed its stdout) before completing the MCP handshake"
        else:
            problem = f"the MCP handshake failed ({type(e).__name__}: {e})"
        return f"{head}: {problem}; {self._stderr_tail()}"

    def _stderr_tail(self) -> str:
        """The server's last stderr line, and where the rest is."""
        self.log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith(SDK_TAG)]
        last = f"its last stderr line: {lines[-1][:300]!r}" if lines else "it wrote nothing to stderr"
        return f"{last} (all of it: {self.log_path})" if lines else last

    def call(self, name: str, arguments: dict, timeout_s: float) -> str:
        """One tools/call on the loop thread; ToolTimeout past timeout_s, ToolError for any failure."""
        gone = f"{name}: the MCP server ({self.command}) is no longer running"
        if self.closed or self.session is None:
            raise ToolError(f"{name}: the MCP server is closed")
        coro = self.session.call_tool(name, arguments)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is gone: the session ended with the server
            coro.close()
            raise ToolError(gone) from None
        try:
            result = future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # the SDK tells the server (notifications/cancelled)
            raise ToolTimeout(f"{name}: no result within {timeout_s:g} s") from None
        except concurrent.futures.CancelledError:
            raise ToolError(gone) from None
        except MCPError as e:
            raise ToolError(gone if e.code == mcp_types.CONNECTION_CLOSED else f"{name}: {e}") from None
        except Exception as e:
            raise ToolError(f"{name}: {type(e).__name__}: {e}") from None
        if result.is_error:
            raise ToolError(_text(result) or f"{name}: the tool reported an error")
        return _text(result)

    def close(self) -> None:
        """End the session and make sure the server process is gone; idempotent (each step is a no-op once done)."""
        self.closed = True
        if self.loop is not None and self.scope is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self.loop.call_soon_threadsafe(self.scope.cancel)
        self.thread.join(CLOSE_TIMEOUT_S)
        if self.thread.is_alive() and self.pid is not None:  # the SDK's shutdown is stuck: kill the group ourselves
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        with self.lock:
            if not self.log.closed:
                _route_sdk_logs(self.sdk_log, False)
                self.log.close()
                if self.temp_log and os.path.exists(self.log_path) and os.path.getsize(self.log_path) == 0:
                    os.remove(self.log_path)


def mcp_tools(command: str, timeout_s: float, *, startup_timeout_s: float = STARTUP_TIMEOUT_S, log_path: str | None = None) -> list[Tool]:
    """Start the MCP server of `command` over stdio and return one Tool per tool it lists (all share one close)."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise UserError(f"--mcp_server_command {command}: cannot split it as a shell command line ({e})") from None
    if not argv:
        raise UserError("--mcp_server_command is empty: give the command that starts the MCP server")
    server = _Server(argv, startup_timeout_s, log_path)
    listed = server.start()
    atexit.register(server.close)

    close = server.close  # one object: the runner closes each distinct close once

    def runner(name: str):
        return lambda arguments: server.call(name, arguments, timeout_s)

    return [Tool(t.name, t.description or "", t.input_schema, runner(t.name), close=close, own_timeout=True) for t in listed]
