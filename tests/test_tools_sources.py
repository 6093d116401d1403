"""The tool sources, run for real: the python tool in real subprocesses, the search tool on a corpus written here,
module_tools on a file written here."""

import json
import os
import signal
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from open_instruct2.errors import UserError
from open_instruct2.tools.base import ToolError, ToolTimeout
from open_instruct2.tools.functions import module_tools
from open_instruct2.tools.python_tool import cut, exit_description, python_tool
from open_instruct2.tools.search import search_tool


def run_code(code: str, timeout_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 2000) -> str:
    """One call of a freshly built python tool."""
    return python_tool(timeout_s, memory_mb, max_output_chars).run({"code": code})


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- python tool


def test_python_tool_schema():
    tool = python_tool(3, 256, 100)
    assert tool.name == "python" and tool.own_timeout and tool.text_argument == "code"


def test_python_prints_output():
    assert run_code("print(6 * 7)\nimport sys; print('warn', file=sys.stderr)") == "42\nwarn\n"


def test_python_empty_output_says_so():
    assert run_code("x = 1") == "(no output)"


def test_python_exception_is_tool_error_with_traceback():
    with pytest.raises(ToolError) as e:
        run_code("print('before')\nraise ValueError('bad value 17')")
    message = str(e.value)
    assert not isinstance(e.value, ToolTimeout)
    assert message.startswith("before\n") and "Traceback" in message and "ValueError: bad value 17" in message
    assert message.endswith("[exit status 1]")


def test_python_timeout_kills_the_whole_group(tmp_path):
    pids = tmp_path / "pids"
    code = textwrap.dedent(f"""
        import os, subprocess
        child = subprocess.Popen(["sleep", "60"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        while True:
            pass
    """)
    start = time.monotonic()
    with pytest.raises(ToolTimeout, match="timed out after 2 s"):
        run_code(code, timeout_s=2.0)
    assert time.monotonic() - start < 4.0
    leader, child = map(int, pids.read_text().split())
    deadline = time.monotonic() + 2.0
    while not (gone(leader) and gone(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(leader) and gone(child)
    assert not [p for p in psutil.process_iter() if safe_pgid(p.pid) == leader and not gone(p.pid)]


def safe_pgid(pid: int) -> int | None:
    """The process group of pid, None when it is gone."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_python_leftover_background_process_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    run_code(f"import subprocess\nopen({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '60']).pid))")
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 2.0
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid)


def test_python_memory_limit_raises_memory_error():
    with pytest.raises(ToolError, match="MemoryError"):
        run_code("b = bytearray(2 * 1024**3)\nprint(len(b))", memory_mb=256)


def test_python_file_size_limit():
    with pytest.raises(ToolError, match="File too large|SIGXFSZ"):
        run_code("open('big', 'wb').write(b'x' * (32 * 1024**2))")


def test_python_output_is_cut():
    out = run_code("print('x' * 10000)", max_output_chars=200)
    assert len(out) == 200 and out.startswith("xxx") and out.endswith("[output cut to 200 characters]")


def test_python_error_output_is_cut_and_keeps_exit_status():
    with pytest.raises(ToolError) as e:
        run_code("print('y' * 10000)\nraise SystemExit(3)", max_output_chars=200)
    assert len(str(e.value)) <= 200 and "[output cut to" in str(e.value) and str(e.value).endswith("[exit status 3]")


def test_python_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("OPEN_INSTRUCT2_TEST_SECRET", "xyz")
    env = json.loads(run_code("import json, os; print(json.dumps(dict(os.environ)))"))
    assert "OPEN_INSTRUCT2_TEST_SECRET" not in env and "xyz" not in env.values()
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}


def test_python_runs_in_a_temporary_folder_removed_afterwards():
    cwd, home, stdin = run_code("import os, sys; print(os.getcwd()); print(os.environ['HOME']); print(repr(sys.stdin.read()))").split("\n")[:3]
    assert cwd == home and Path(cwd).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert not Path(cwd).exists()
    assert stdin == "''"


def test_python_isolated_mode_ignores_python_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-oi2")
    assert run_code("import sys; print(sys.flags.isolated, '/nonexistent-oi2' in sys.path)") == "1 False\n"


def test_cut_and_exit_description():
    assert cut("abc", 10) == "abc"
    assert exit_description(2) == "exit status 2"
    assert exit_description(-signal.SIGXCPU) == "killed by SIGXCPU (CPU time limit)"


# --- search tool


def write_corpus(path: Path, rows: list) -> str:
    """rows (dicts as JSON, strings as they are) one per line; the path."""
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


CORPUS = [
    {"title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"text": "The mitochondrion is the powerhouse of the cell.", "id": "bio-1"},
    {"title": "Python", "text": "Python is a programming language created by Guido van Rossum."},
    {"title": "Berlin", "text": "Berlin is the capital of Germany."},
]


def test_search_ranks_the_relevant_document_first(tmp_path):
    tool = search_tool(write_corpus(tmp_path / "c.jsonl", CORPUS), top_k=2)
    out = tool.run({"query": "capital of France"})
    assert out.startswith("[1] Paris\nParis is the capital") and "[2] Berlin" in out and "[3]" not in out
    assert tool.name == "search" and tool.text_argument == "query"


def test_search_top_k_and_untitled_documents(tmp_path):
    tool = search_tool(write_corpus(tmp_path / "c.jsonl", CORPUS), top_k=1)
    out = tool.run({"query": "powerhouse cell"})
    assert out == "[1]\nThe mitochondrion is the powerhouse of the cell."


def test_search_no_match_and_blank_query(tmp_path):
    tool = search_tool(write_corpus(tmp_path / "c.jsonl", CORPUS), top_k=3)
    assert "no documents match" in tool.run({"query": "zebra"}).lower()
    with pytest.raises(ToolError, match="empty"):
        tool.run({"query": "   "})


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([CORPUS[0], "{not json"], r"line 2: not JSON"),
        ([CORPUS[0], CORPUS[1], {"title": "no text"}], r'line 3: needs a "text" string field'),
        ([], r"has no documents"),
    ],
)
def test_search_bad_corpus_names_file_and_line(tmp_path, rows, expected):
    path = write_corpus(tmp_path / "bad.jsonl", rows) if rows else str(tmp_path / "empty.jsonl")
    if not rows:
        Path(path).write_text("\n\n")
    with pytest.raises(UserError, match=expected) as e:
        search_tool(path, top_k=3)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_search_missing_corpus(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        search_tool(str(tmp_path / "nope.jsonl"), top_k=3)


# --- module tools


MODULE = '''
import json
from typing import Literal

def add(a: int, b: int = 1) -> int:
    """Adds two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b

def weather(city: str, unit: Literal["c", "f"]) -> dict:
    """Looks up the weather.

    Args:
        city: The city name.
        unit: Temperature unit.
    """
    if city == "Atlantis":
        raise LookupError("no such city")
    return {"city": city, "temp": 21, "unit": unit}

def _helper(x):
    return x
'''


def write_module(tmp_path: Path, source: str, name: str = "my_tools.py") -> str:
    """source written as a Python file; its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_module_functions_become_tools(tmp_path):
    add, weather = module_tools(write_module(tmp_path, MODULE))
    assert (add.name, add.description) == ("add", "Adds two integers.")
    assert add.parameters == {
        "type": "object",
        "properties": {"a": {"type": "integer", "description": "The first number."}, "b": {"type": "integer", "description": "The second number."}},
        "required": ["a"],
    }
    assert weather.parameters["properties"]["unit"] == {"type": "string", "enum": ["c", "f"], "description": "Temperature unit."}
    assert weather.parameters["required"] == ["city", "unit"]
    assert add.run({"a": 2, "b": 3}) == "5" and add.run({"a": 2}) == "3"
    assert json.loads(weather.run({"city": "Oslo", "unit": "c"})) == {"city": "Oslo", "temp": 21, "unit": "c"}


def test_module_tool_wrong_arguments_are_tool_errors(tmp_path):
    add, _ = module_tools(write_module(tmp_path, MODULE))
    with pytest.raises(ToolError, match="missing required argument.*a"):
        add.run({"b": 3})
    with pytest.raises(ToolError, match="unknown argument.*c"):
        add.run({"a": 1, "c": 2})


def test_module_tool_exception_becomes_tool_error(tmp_path):
    _, weather = module_tools(write_module(tmp_path, MODULE))
    with pytest.raises(ToolError, match="^LookupError: no such city$") as e:
        weather.run({"city": "Atlantis", "unit": "c"})
    assert isinstance(e.value.__cause__, LookupError)


def test_module_function_without_docstring(tmp_path):
    path = write_module(tmp_path, MODULE + "\ndef undocumented(x: int) -> int:\n    return x\n")
    with pytest.raises(UserError, match="function undocumented: .*docstring") as e:
        module_tools(path)
    assert "\n" not in str(e.value)


def test_module_function_without_type_hints(tmp_path):
    path = write_module(tmp_path, 'def f(x):\n    """Does f.\n\n    Args:\n        x: A value.\n    """\n')
    with pytest.raises(UserError, match="function f: .*type hint"):
        module_tools(path)


def test_module_import_error(tmp_path):
    path = write_module(tmp_path, "import not_a_module_oi2\n")
    with pytest.raises(UserError, match="importing it raised ModuleNotFoundError: No module named 'not_a_module_oi2'") as e:
        module_tools(path)
    assert path in str(e.value)


def test_module_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        module_tools(str(tmp_path / "absent.py"))
    with pytest.raises(UserError, match="defines no public function"):
        module_tools(write_module(tmp_path, "from os.path import join\nX = 1\ndef _private() -> None:\n    pass\n"))
