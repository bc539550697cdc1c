"""The sandbox's promises on inputs beyond the basics: determinism, the trainer's process state, cleanup
after an interrupted call, what a failure is labelled, and the calculator on digits of other scripts."""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
import time
import typing

import pytest

from minigrpo.tools import ToolCall, calculator, call_tool, python_tool
from minigrpo.tools import sandbox as sandbox_module
from minigrpo.tools.sandbox import run_python


def _sandbox_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "minigrpo-sandbox-*")))


def test_deterministic_code_gives_the_same_output_in_every_run():
    """String hashes were salted per process (python -I ignores PYTHONHASHSEED), so printing a set of
    words gave another order on each call: the same completion scored differently from one step to
    the next. Hashes are now fixed (PYTHONHASHSEED=0)."""
    code = "words = {'apple', 'pear', 'plum', 'fig', 'kiwi', 'lime', 'date', 'sloe'}\nprint(hash('abc'))\nwords"
    first, second = run_python(code), run_python(code)
    assert first.exit_status == 0, first.stderr
    assert first.stdout == second.stdout
    assert run_python("import sys\nsys.flags.hash_randomization, sys.flags.no_site").stdout == "(0, 1)\n"


def test_the_code_cannot_read_or_signal_the_trainer():
    """The code could read /proc/<trainer pid>/environ (the trainer's tokens and keys: printed into a
    tool result, then into logs and samples) and its fd/ and signal it (os.kill(os.getppid(), 9) or
    os.kill(-1, 9) ended the training). Both are refused now; its own /proc entries still open."""
    code = """
import os
parent = os.getppid()
for attempt in (lambda: open(f"/proc/{parent}/environ", "rb").read(), lambda: os.listdir(f"/proc/{parent}/fd"),
                lambda: os.symlink(f"/proc/{parent}", "p") or open("p/environ", "rb").read(),
                lambda: os.kill(parent, 0), lambda: os.kill(-1, 0)):
    try:
        attempt()
        print("allowed")
    except PermissionError as e:
        print("refused:", str(e).split(":")[1].strip())
os.kill(os.getpid(), 0)
print(open("/proc/self/status").readline().split()[0])
"""
    run = run_python(code)
    assert run.exit_status == 0, run.stderr
    assert run.stdout.splitlines() == [
        "refused: another process's files are not allowed",
        "refused: another process's files are not allowed",
        "refused: another process's files are not allowed",
        "refused: os.kill of another process is not allowed",
        "refused: os.kill of another process is not allowed",
        "Name:",
    ]


class _InterruptedPopen(subprocess.Popen):
    """A child the test remembers (every one started), so none outlives a failing test."""

    started: typing.ClassVar[list[subprocess.Popen]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _InterruptedPopen.started.append(self)


def _interrupted_wait(proc, timeout_s):
    """The timed wait for the code, interrupted as by Ctrl-C in the trainer."""
    raise KeyboardInterrupt


def test_an_interrupted_call_leaves_no_process_behind(monkeypatch):
    """Ctrl-C (or any exception) in the trainer while code ran removed the folder but left the code
    running in its own session (it never sees the terminal's SIGINT): a sleep or a loop outlived the
    trainer. The process group is now killed on the way out."""
    _InterruptedPopen.started.clear()
    monkeypatch.setattr(sandbox_module.subprocess, "Popen", _InterruptedPopen)
    monkeypatch.setattr(sandbox_module, "_wait", _interrupted_wait)
    before = _sandbox_dirs()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_python("import time\ntime.sleep(30)", timeout_s=20.0)
        [proc] = _InterruptedPopen.started
        assert proc.poll() == -9  # killed and reaped, not sleeping on
        assert _sandbox_dirs() - before == set()
    finally:
        for proc in _InterruptedPopen.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_exit_status_86_is_no_memory_error():
    """sys.exit(86), the bootstrap's own exit status after a MemoryError, was reported as 'killed:
    memory limit exceeded'; only the bootstrap's MemoryError note makes it one now."""
    run = run_python("import sys\nsys.exit(86)")
    assert (run.exit_status, run.memory_exceeded) == (86, False)
    result = call_tool(python_tool(timeout_s=2.0), ToolCall("python", {"code": "raise SystemExit(86)"}, ""))
    assert (result.ok, result.error_kind, result.content) == (False, "error", "[exit status 86]")
    memory = run_python("b = bytearray(2 * 1024 ** 3)", memory_mb=256)
    assert memory.memory_exceeded and memory.exit_status == 86


@pytest.mark.parametrize(
    "expression, value",
    [("３ + ４", 7), ("١٢ * 2", 24), ("१०० / 8", 12.5), ("(٣ + 1) ** 2", 16)],
)
def test_calculator_reads_digits_of_any_script(expression, value):
    """Fullwidth, Arabic-Indic and Devanagari digits were 'invalid character' errors although int()
    reads them; they now count as the digits they are."""
    assert calculator(expression) == value


def test_calculator_keeps_refusing_superscripts_and_other_symbols():
    with pytest.raises(ValueError, match=r"invalid character '²' \(U\+00B2\) at char 1"):
        calculator("2²")
    with pytest.raises(ValueError, match=r"invalid character '×' \(U\+00D7\) at char 2"):
        calculator("٣ × 4")


def test_a_run_killed_at_the_time_limit_keeps_what_it_printed():
    """stdout to a pipe is block-buffered: a run killed at the time limit lost everything it had printed,
    and the model read only '(no output)' and the kill. The child now flushes just before the limit."""
    t0 = time.monotonic()
    loop = run_python("print('step 1')\nwhile True:\n    pass", timeout_s=0.5)
    assert time.monotonic() - t0 < 1.5
    assert (loop.timed_out, loop.exit_status, loop.stdout) == (True, -9, "step 1\n")
    code = "import threading, time\nprint('started')\nthreading.Thread(target=time.sleep, args=(30,)).start()"
    result = call_tool(python_tool(timeout_s=0.5), ToolCall("python", {"code": code}, ""))
    assert (result.ok, result.error_kind) == (False, "timeout")
    assert result.content.startswith("started\n[killed: time limit exceeded (0.")


def test_native_calls_without_audit_events_cannot_start_processes_or_leave_state(tmp_path):
    """multiprocessing's spawn start method started a process through _posixsubprocess.fork_exec, which
    raises no audit event (the spawned interpreter ran without the hook); named shared memory
    (/dev/shm), an sqlite3 database and os.mkfifo / os.mknod were made outside the working directory and
    outlived the run, for the next episode's code to read. Each is refused now, sqlite3 and fifos wholly
    (a path check had ways around it: ATTACH, a percent-encoded URI, the wrapper's closure holding the
    original mkfifo), and stdlib code that only imports subprocess still runs."""
    shm = f"minigrpo_test_{os.getpid()}"
    code = f"""
import multiprocessing, os, sqlite3, stat, sys
from multiprocessing import shared_memory
attempts = {{
    "spawn": lambda: multiprocessing.get_context("spawn").Process(target=os.getpid).start(),
    "forkserver": lambda: multiprocessing.get_context("forkserver").Process(target=os.getpid).start(),
    "shm": lambda: shared_memory.SharedMemory(name={shm!r}, create=True, size=64),
    "sqlite": lambda: sqlite3.connect({str(tmp_path / "x.db")!r}).execute("create table t(x)"),
    "sqlite_uri": lambda: sqlite3.connect("file:%2F{str(tmp_path / "y.db")[1:]}?xmode=memory", uri=True),
    "sqlite_attach": lambda: sqlite3.connect(":memory:").execute("ATTACH DATABASE {str(tmp_path / "z.db")!r} AS z"),
    "mkfifo": lambda: os.mkfifo({str(tmp_path / "fifo")!r}),
    "mknod": lambda: os.mknod({str(tmp_path / "node")!r}, stat.S_IFREG | 0o600),
    "setxattr": lambda: os.setxattr({str(tmp_path)!r}, "user.x", b"1"),
    "reload": lambda: (sys.modules.pop("_posixsubprocess"), __import__("_posixsubprocess")),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "allowed")
    except PermissionError as e:
        print(name, "refused:", str(e).split(": ")[1])
import subprocess, asyncio.subprocess
print(sorted(os.listdir(".")))
"""
    run = run_python(code, timeout_s=20.0)
    assert run.exit_status == 0, run.stderr
    assert run.stdout.splitlines() == [
        "spawn refused: _posixsubprocess.fork_exec is not allowed",
        "forkserver refused: _posixsubprocess.fork_exec is not allowed",
        "shm refused: _posixshmem.shm_open is not allowed",
        "sqlite refused: sqlite3.connect is not allowed",
        "sqlite_uri refused: sqlite3.connect is not allowed",
        "sqlite_attach refused: sqlite3.connect is not allowed",
        "mkfifo refused: os.mkfifo is not allowed",
        "mknod refused: os.mknod is not allowed",
        "setxattr refused: os.setxattr outside the working directory is not allowed",
        "reload refused: loading _posixsubprocess again is not allowed",
        "[]",
    ]
    assert list(tmp_path.iterdir()) == [] and not os.path.exists(f"/dev/shm/{shm}")
