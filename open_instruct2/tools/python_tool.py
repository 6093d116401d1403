"""The python tool: each call runs the model's code as a script in a fresh Python process and returns what it printed.

What this limits: wall-clock time (the whole process group is killed after the timeout), CPU time, address space
(memory), the size of any file it writes, core dumps, and where it starts (a fresh temporary folder as its working
folder, HOME and TMPDIR, deleted after the call). The process gets a minimal environment (PATH, LANG, HOME, TMPDIR;
never the trainer's own, which may hold API keys), no stdin, and its own session, so nothing it starts outlives the
call unless it leaves that session on purpose.

What this is NOT: a sandbox. The code runs as your user: it can read any file you can read, write outside its folder
with absolute paths, use the network, and start processes that call setsid to escape the kill. It is meant for a
policy you train on your own machine; for untrusted settings (shared machines, models you do not control) run the
trainer in a container or VM.

Linux and macOS only (POSIX resource limits; macOS may not enforce the memory limit). The limits are set by a small
launcher process that then execs the code's interpreter, rather than by `preexec_fn`, which is unsafe when other
threads run (the runner calls tools from several threads at once)."""

import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from .base import Tool, ToolError, ToolTimeout, string_tool

FILE_SIZE_LIMIT_BYTES = 16 * 1024 * 1024

# Run as `python -I -c LAUNCHER as_bytes cpu_s fsize_bytes script`: sets the limits, then becomes the script's process.
LAUNCHER = """
import os, resource, sys
def cap(kind, soft, hard):
    try:
        old_hard = resource.getrlimit(kind)[1]
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(kind, (soft, hard))
    except (ValueError, OSError):
        pass  # a limit this OS refuses (RLIMIT_AS on macOS); the others still hold
memory, cpu, fsize, script = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cap(resource.RLIMIT_AS, memory, memory)
cap(resource.RLIMIT_CPU, cpu, cpu + 1)
cap(resource.RLIMIT_FSIZE, fsize, fsize)
cap(resource.RLIMIT_CORE, 0, 0)
os.execv(sys.executable, [sys.executable, "-I", script])
"""

SIGNAL_REASONS = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit"}


def python_tool(timeout_s: float, memory_mb: int, max_output_chars: int) -> Tool:
    """The "python" tool: one argument "code", run as a script under the limits above."""
    if sys.platform == "win32":
        raise UserError("--tools python: the python tool needs POSIX resource limits (Linux or macOS); drop it from --tools on Windows")
    description = (
        f"Runs Python 3 code as a script in a fresh process and returns what it prints (stdout, then stderr). "
        f"Nothing is kept between calls, so print every value you want to see. "
        f"Limits: {timeout_s:g} seconds, {memory_mb} MiB of memory."
    )
    return string_tool(
        "python", description, "code", "Python source code to run as a script",
        lambda code: run_python(code, timeout_s, memory_mb, max_output_chars), own_timeout=True,
    )


def run_python(code: str, timeout_s: float, memory_mb: int, max_output_chars: int) -> str:
    """Runs one piece of code; its output, or ToolError (nonzero exit) / ToolTimeout (past timeout_s)."""
    with tempfile.TemporaryDirectory(prefix="oi2_python_", ignore_cleanup_errors=True) as root:
        work, stdout_path, stderr_path = Path(root, "work"), Path(root, "stdout"), Path(root, "stderr")
        work.mkdir()
        script = work / "main.py"
        script.write_text(code, encoding="utf-8")
        limits = [str(memory_mb * 1024 * 1024), str(math.ceil(timeout_s) + 1), str(FILE_SIZE_LIMIT_BYTES)]
        command = [sys.executable, "-I", "-c", LAUNCHER, *limits, str(script)]
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            status = run_in_own_group(command, work, stdout, stderr, timeout_s)
        output = read_output(stdout_path, max_output_chars) + read_output(stderr_path, max_output_chars)
    if status is None:
        raise ToolTimeout(f"python: timed out after {timeout_s:g} s; the process was killed (make the code faster or do less per call)")
    if status != 0:
        ending = f"\n[{exit_description(status)}]"
        raise ToolError(cut(output, max_output_chars - len(ending)) + ending)
    return cut(output, max_output_chars) if output else "(no output)"


def run_in_own_group(command: list[str], work: Path, stdout, stderr, timeout_s: float) -> int | None:
    """Runs the command in its own session; its exit status, or None after killing its group at the timeout."""
    process = subprocess.Popen(
        command, cwd=work, env=minimal_environment(work), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        start_new_session=True, close_fds=True,
    )
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        kill_group(process.pid)  # after a timeout, and anything it left running after exiting
        process.wait()


def kill_group(group_id: int) -> None:
    """SIGKILL to every process of the group (none left is fine)."""
    try:
        os.killpg(group_id, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def minimal_environment(work: Path) -> dict[str, str]:
    """What the code's process sees: a PATH, a UTF-8 locale, and its own folder as HOME and TMPDIR; nothing else."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}


def read_output(path: Path, max_chars: int) -> str:
    """The start of an output file, one character past max_chars at most (enough to know it was cut)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(max_chars + 1)


def cut(text: str, max_chars: int) -> str:
    """text within max_chars, a note included when it was cut."""
    if len(text) <= max_chars:
        return text
    note = f"\n... [output cut to {max_chars} characters]"
    if len(note) >= max_chars:
        return text[: max(max_chars, 0)]
    return text[: max_chars - len(note)] + note


def exit_description(status: int) -> str:
    """'exit status 1', or 'killed by SIGXCPU (CPU time limit)' for a negative status."""
    if status >= 0:
        return f"exit status {status}"
    name = signal.Signals(-status).name if -status in signal.valid_signals() else f"signal {-status}"
    reason = SIGNAL_REASONS.get(name)
    return f"killed by {name}" + (f" ({reason})" if reason else "")
