"""MCP tools (open_instruct2/tools/mcp_tools.py) against a real stdio server, tests/mcp_example_server.py."""

import shlex
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from open_instruct2.errors import UserError
from open_instruct2.tools.base import ToolError, ToolTimeout
from open_instruct2.tools.mcp_tools import mcp_tools

REPO = Path(__file__).resolve().parents[1]
SERVER = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tests' / 'mcp_example_server.py'))}"
PY = shlex.quote(sys.executable)


def server_pids(flag: str = "mcp_example_server.py") -> set[int]:
    """Our children that run the example server (with `flag` on their command line)."""
    pids = set()
    for p in psutil.Process().children():
        try:
            line = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "mcp_example_server.py" in line and flag in line:
            pids.add(p.pid)
    return pids


def started(tmp_path, timeout_s=1.0):
    """A fresh server's tools by name, and its pid."""
    before = server_pids()
    tools = {t.name: t for t in mcp_tools(SERVER, timeout_s, log_path=str(tmp_path / "server.log"))}
    (pid,) = server_pids() - before
    return tools, pid


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    tools, _ = started(tmp_path_factory.mktemp("mcp"))
    yield tools
    tools["add"].close()


def test_lists_the_tools_with_their_schemas(tools):
    assert set(tools) == {"add", "calculator", "echo", "fail", "slow"}
    add = tools["add"].parameters
    assert add["type"] == "object" and add["required"] == ["a", "b"]
    assert add["properties"]["a"]["type"] == add["properties"]["b"]["type"] == "integer"
    assert tools["echo"].text_argument == "text"  # one required string: the tags parser can fill it
    assert tools["slow"].parameters["properties"]["seconds"]["type"] == "number"
    assert tools["add"].description == "Add two integers."
    assert all(t.own_timeout for t in tools.values())
    assert len({id(t.close) for t in tools.values()}) == 1  # one shared close


def test_calls_return_the_text(tools):
    assert tools["add"].run({"a": 2, "b": 40}) == "42"
    assert tools["echo"].run({"text": "héllo <b>"}) == "héllo <b>"


def test_a_failing_tool_raises_tool_error_with_its_message(tools):
    with pytest.raises(ToolError, match="this tool always fails") as info:
        tools["fail"].run({})
    assert not isinstance(info.value, ToolTimeout)


def test_bad_arguments_are_a_tool_error(tools):
    with pytest.raises(ToolError):
        tools["add"].run({"a": "x"})


def test_slow_call_times_out_and_later_calls_still_work(tools):
    start = time.monotonic()
    with pytest.raises(ToolTimeout, match="1 s"):
        tools["slow"].run({"seconds": 30})
    assert time.monotonic() - start < 3
    assert tools["slow"].run({"seconds": 0.01}) == "slept 0.01"
    assert tools["add"].run({"a": 1, "b": 1}) == "2"


def test_concurrent_calls_share_the_session(tools):
    results, errors = [], []

    def call(i):
        try:
            results.append(tools["slow"].run({"seconds": 0.4}) + f" {i}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    start = time.monotonic()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert time.monotonic() - start < 6 * 0.4  # they ran at once, not one after another


def test_close_stops_the_server_and_is_idempotent(tmp_path):
    tools, pid = started(tmp_path)
    assert tools["echo"].run({"text": "up"}) == "up"
    start = time.monotonic()
    tools["echo"].close()
    assert not psutil.pid_exists(pid)
    tools["add"].close()  # every tool's close may be called
    assert time.monotonic() - start < 5
    with pytest.raises(ToolError, match="closed"):
        tools["add"].run({"a": 1, "b": 2})


def test_a_dead_server_is_a_tool_error_not_a_crash(tmp_path):
    tools, pid = started(tmp_path, timeout_s=5.0)
    psutil.Process(pid).kill()
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(ToolError, match="no longer running") as info:
            tools["add"].run({"a": 1, "b": 2})
        assert not isinstance(info.value, ToolTimeout) and time.monotonic() - start < 2
    tools["add"].close()


def test_missing_program_is_a_user_error():
    with pytest.raises(UserError, match=r"--mcp_server_command no-such-mcp-server-xyz --flag: program 'no-such-mcp-server-xyz' not found"):
        mcp_tools("no-such-mcp-server-xyz --flag", 1.0)


def test_a_server_without_tools_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"--mcp_server_command .*mcp_example_server.py --no-tools: the server lists no tools"):
        mcp_tools(SERVER + " --no-tools", 1.0, log_path=str(tmp_path / "log"))
    assert not server_pids("--no-tools")  # stopped before the error


@pytest.mark.parametrize(
    "code, problem",
    [
        ("import sys; print('bad config', file=sys.stderr)", r"exited \(or closed its stdout\) before completing the MCP handshake; its last stderr line: 'bad config'"),
        ("import time; time.sleep(60)", r"no MCP handshake within the start-up timeout of 1 s"),
        ("print('hello', flush=True); import time; time.sleep(60)", r"start-up timeout of 1 s .*its stdout is not MCP JSON-RPC"),
    ],
    ids=["exits", "silent", "not-json-rpc"],
)
def test_not_an_mcp_server_is_a_user_error_within_the_startup_timeout(tmp_path, code, problem):
    before = set(p.pid for p in psutil.Process().children())
    start = time.monotonic()
    with pytest.raises(UserError, match=problem) as info:
        mcp_tools(f"{PY} -c {shlex.quote(code)}", 1.0, startup_timeout_s=1.0, log_path=str(tmp_path / "log"))
    assert time.monotonic() - start < 1.0 + 4.5  # the timeout, then the SDK's stop (stdin closed, 2 s, SIGTERM)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"--mcp_server_command {PY} -c ")
    assert not (set(p.pid for p in psutil.Process().children()) - before)  # the child is gone


def test_start_up_failures_and_exit_put_nothing_on_stderr(tmp_path):
    """As the CLI sees it: only our one line (stdout here), no traceback or asyncio noise; atexit stops a server that
    would outlive us."""
    script = textwrap.dedent(f"""
        from open_instruct2.errors import UserError
        from open_instruct2.tools.mcp_tools import mcp_tools
        for code in ("raise SystemExit(3)", "print('hello', flush=True); import time; time.sleep(60)"):
            try:
                mcp_tools({PY!r} + " -c " + repr(code), 1.0, startup_timeout_s=0.5, log_path={str(tmp_path / "a.log")!r})
            except UserError as e:
                print("USER ERROR", e)
        tools = mcp_tools({SERVER!r} + " --linger", 1.0, log_path={str(tmp_path / "b.log")!r})  # stays on after its stdin closes: needs the SIGTERM
        import psutil
        print("PID", psutil.Process().children()[0].pid, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.count("USER ERROR --mcp_server_command") == 2
    pid = int(out.stdout.split("PID ")[1])
    assert not psutil.pid_exists(pid)  # closed by the atexit hook
