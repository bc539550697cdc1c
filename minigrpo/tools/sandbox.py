"""Run untrusted Python code (a model's tool call) in a separate, limited, throw-away process.

    result = run_python("print(2 ** 10)", timeout_s=5.0)
    result.stdout, result.stderr, result.exit_status, result.timed_out, result.memory_exceeded

The code runs in `python -s -S -P -B -X utf8` (no user or site packages, so only the standard library
imports; no .pyc writing) in its own session, under an environment built from scratch whose only PYTHON*
variable is PYTHONHASHSEED=0: str and bytes hashes, and so the order of a set of strings, are the same in
every run (deterministic code gives the same answer every time; `-I` would ignore the seed). With:
- a wall-time limit: past `timeout_s` the whole process group is killed (SIGKILL);
  a run counts as stopped by the CPU limit only when its CPU time (os.wait4's usage) reached it: a
  SIGKILL also comes from the system's out-of-memory killer or from the code itself;
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE) and, where the kernel
  enforces it for this user, process count (RLIMIT_NPROC = 0: no fork, no threads) limits, set by the
  child on itself before the code runs (soft = hard, so the code cannot raise them again). Setting them
  in the child rather than in a `preexec_fn` keeps the parent safe: preexec_fn runs between fork and
  exec, which can deadlock in a parent with threads (a trainer always has some);
- an output limit: stdout keeps its first `max_output_chars`, stderr its last ones (the traceback);
  shortly before the time limit (SIGALRM) the child flushes both, so a killed run keeps what it printed;
- a fresh temporary working directory (HOME too), removed afterwards; an emptied environment (no
  proxies, no tokens); stdin from /dev/null;
- an audit hook (`sys.addaudithook`, installed by the bootstrap before the code runs, and not
  removable from Python) that refuses socket events (no network; only AF_UNIX sockets may be made, as
  asyncio's self-pipe socketpair, and bound only to a path in the working directory, never connected),
  starting processes (subprocess, os.system / exec / fork / spawn: a child would not carry the hook),
  ctypes, changing rlimits, and
  opening for writing, removing, renaming or creating files outside the working directory (a relative
  path counts from the code's current directory, wherever os.chdir took it), reading another process's
  /proc/<pid> entries (the trainer's environ holds its tokens, its fd/ its open files) and signalling any
  process but itself (os.kill(os.getppid(), 9) or os.kill(-1, 9) would end the trainer); sqlite3
  (it writes its files itself, with no "open" event, and ATTACH names any path);
- the native calls that raise no audit event replaced by refusals before the code runs (and their modules
  not loaded again): `_posixsubprocess.fork_exec` (multiprocessing's spawn and forkserver start methods and
  its resource tracker start processes through it), `_posixshmem` (named shared memory outlives the run:
  the next episode's code could read it) and os.mkfifo / os.mknod (no wrapper: it would hold the original);
- cleanup on every way out: a run interrupted in the parent (Ctrl-C, an exception) kills the code's
  process group before the folder is removed, so no process outlives the call.

What this does NOT guarantee: an audit hook is not a security boundary. It stops ordinary Python code
(a model's mistakes, a careless `open('/etc/x', 'w')`, `urllib.request.urlopen`), but hostile code can
get around it (through native code already loaded, interpreter internals, bugs). Reading files the user
can read is allowed. The real boundary is the operating system's: a container, a separate user,
seccomp, a network namespace; run training jobs that execute model code inside one.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import IO

__all__ = ["MEMORY_EXIT_STATUS", "SandboxResult", "run_python"]

MEMORY_EXIT_STATUS = 86  # the bootstrap's exit status after a MemoryError in the code
MEMORY_NOTE = "MemoryError: the code ran out of memory (sandbox limit)"  # its last line of stderr
_CPU_SLACK_S = 0.1  # RLIMIT_CPU is checked at scheduler ticks; rusage read 0.993 s at a 1 s limit

# The child's entry point, run with `-c`: argv = [code file, work dir, limits JSON]. It limits itself,
# installs the audit hook, then runs the code as __main__ and echoes the value of a last expression.
_BOOTSTRAP = r"""
import ast, json, os, resource, signal, sys, time, traceback
_code_path, _work, _limits = sys.argv[1], os.path.realpath(sys.argv[2]), json.loads(sys.argv[3])
_flush_at = float(sys.argv[4])  # time.monotonic() shortly before the parent's kill (one clock for both)
def _set_limits(limits):
    for name, value in limits.items():
        try:
            kind = getattr(resource, name)
            hard = resource.getrlimit(kind)[1]
            finite = hard != resource.RLIM_INFINITY
            soft = min(value, hard) if finite else value
            new_hard = soft + 1 if name == "RLIMIT_CPU" else soft  # CPU: SIGXCPU at soft, SIGKILL at hard
            resource.setrlimit(kind, (soft, min(new_hard, hard) if finite else new_hard))
        except (ValueError, OSError, AttributeError):
            pass  # a limit this platform lacks

_set_limits(_limits)

def _flush_before_the_kill(signum, frame):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass  # e.g. the code was inside a write of its own (a reentrant call): keep what it holds

signal.signal(signal.SIGALRM, _flush_before_the_kill)
signal.setitimer(signal.ITIMER_REAL, max(0.001, _flush_at - time.monotonic()))
with open(_code_path, encoding="utf-8") as _f:
    _source = _f.read()
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn",
            "os.spawn", "pty.", "ctypes.", "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "gc.get_",
            "sqlite3.")
_PATH_ARGS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.chmod": (0,),
              "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.symlink": (1,), "os.link": (1,),
              "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (1,), "os.setxattr": (0,),
              "os.removexattr": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _plain(path):
    # the path as the system call reads it: a str or bytes subclass may override the methods a check calls,
    # so the checks read a plain copy of its contents; other path-likes only from pathlib itself
    if isinstance(path, str):
        return str.__str__(path)
    if isinstance(path, bytes):
        return bytes.__getitem__(path, slice(None))
    if isinstance(path, int):
        return int.__index__(path)
    if type(path).__module__ == "pathlib":
        return str.__str__(os.fspath(path))
    raise PermissionError(f"sandbox: a path of type {type(path).__name__} is not allowed (str, bytes or pathlib)")

def _inside(path, _work=_work, _plain=_plain):
    path = _plain(path)
    if isinstance(path, int):
        return True  # an open file descriptor
    full = os.path.realpath(os.fsdecode(path))  # a relative path from the current directory (os.chdir moves it)
    return full == _work or full.startswith(_work + os.sep)

def _other_process(path, _own=(str(os.getpid()), "self", "thread-self"), _plain=_plain):
    path = _plain(path)
    if isinstance(path, int):
        return False
    name = os.fsdecode(path)
    for full in (os.path.abspath(name), os.path.realpath(name)):  # as written, and through any symlink
        parts = full.split(os.sep)
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] not in _own:
            return True
    return False

def _refused(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is not allowed")
    return refused

def _replace_native():
    # native calls that raise no audit event: _posixsubprocess.fork_exec starts processes (multiprocessing's
    # spawn and forkserver, its resource tracker), _posixshmem makes named shared memory that outlives the
    # run, mkfifo and mknod make files; replaced before the code runs (the hook refuses loading them again)
    native = {"_posixsubprocess": ("fork_exec",), "_posixshmem": ("shm_open", "shm_unlink")}
    for module_name, names in native.items():
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name in names:
            setattr(module, name, _refused(f"{module_name}.{name}"))
    import posix
    for name in ("mkfifo", "mknod"):  # refused, not path-checked: a wrapper would hold the original
        if hasattr(posix, name):
            setattr(posix, name, _refused(f"os.{name}"))
            setattr(os, name, getattr(posix, name))
    return (*native, "posix")

def _local_socket(event, args, _inside=_inside, _plain=_plain):
    # an AF_UNIX (1 on every POSIX system) socket reaches no network: asyncio's self-pipe is a socketpair;
    # one may be bound to a path in the working directory, never connected (a daemon's socket file)
    if event == "socket.__new__":
        return type(args[1]) is int and args[1] == 1
    address = _plain(args[1]) if event == "socket.bind" and isinstance(args[1], (str, bytes)) else None
    return isinstance(address, (str, bytes)) and address[:1] not in ("", b"", "\0", b"\0") and _inside(address)

def _audit(event, args, _blocked=_BLOCKED, _path_args=_PATH_ARGS, _write=_WRITE_FLAGS, _inside=_inside,
           _other=_other_process, _local=_local_socket, _reload=_replace_native(), _me=[], _pid=os.getpid()):
    if event.startswith("socket.") and _local(event, args):
        return
    if event.startswith(_blocked):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in _reload:  # raised only where a module loads: the originals again
        raise PermissionError(f"sandbox: loading {args[0]} again is not allowed")
    if event == "object.__setattr__" and any(args[0] is f for f in _me):  # rewriting the hook itself
        raise PermissionError("sandbox: the audit hook cannot be changed")
    if event in ("os.kill", "os.killpg") and args[0] not in (0, _pid, -_pid):  # its own group is itself
        raise PermissionError(f"sandbox: {event} of another process is not allowed: {args[0]!r}")
    if event in ("open", "os.listdir", "os.scandir") and args and _other(args[0]):
        raise PermissionError(f"sandbox: another process's files are not allowed: {args[0]!r}")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _write)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
    elif event in _path_args:
        for i in _path_args[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: {args[i]!r}")

_audit.__defaults__[-2].extend([_audit, _inside, _other_process, _local_socket, _plain])
sys.addaudithook(_audit)
del _f, _limits, _set_limits, _flush_at, _flush_before_the_kill, _audit, _inside, _other_process, _local_socket, _plain
del _BLOCKED, _PATH_ARGS, _WRITE_FLAGS, _refused, _replace_native

def _main(source):
    tree = ast.parse(source, "<code>")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(tree, "<code>", "exec"), scope)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<code>", "eval"), scope)
        if value is not None:
            print(repr(value))

try:
    _main(_source)
except SystemExit:
    raise
except MemoryError:
    sys.stderr.write("MEMORY_NOTE\n")
    sys.stderr.flush()
    os._exit(MEMORY_EXIT)
except BaseException as _e:  # the traceback without the bootstrap's frames (file "<string>")
    _te = traceback.TracebackException.from_exception(_e)
    _te.stack = traceback.StackSummary.from_list([f for f in _te.stack if f.filename != "<string>"])
    sys.stderr.write("".join(_te.format()))
    sys.exit(1)
""".replace("MEMORY_EXIT", str(MEMORY_EXIT_STATUS)).replace("MEMORY_NOTE", MEMORY_NOTE)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """One run: output (stdout's head, stderr's tail), exit status (-N: killed by signal N) and flags."""

    stdout: str
    stderr: str
    exit_status: int | None
    timed_out: bool = False  # killed at the wall-time limit
    memory_exceeded: bool = False  # a MemoryError under the address-space limit
    cpu_exceeded: bool = False  # killed at the CPU-time limit (SIGXCPU / SIGKILL, the limit's CPU time used)
    output_truncated: bool = False
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time the code's process used (user + system)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.timed_out


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_file_mb: int = 16,
    max_output_chars: int = 8000,
    limit_processes: bool = True,
) -> SandboxResult:
    """Run `code` in a limited child process (see the module docstring) and collect what it did.

    cpu_s (a backstop behind the wall-time limit) defaults to timeout_s + 1, rounded up; memory_mb
    limits the address space (the interpreter itself needs about 30 MB of it); max_file_mb limits
    every file the code writes.
    """
    limits = {
        "RLIMIT_CPU": max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s + 1)),
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_FSIZE": max_file_mb << 20,
        "RLIMIT_CORE": 0,
    }
    if limit_processes:
        limits["RLIMIT_NPROC"] = 0
    root = tempfile.mkdtemp(prefix="minigrpo-sandbox-")
    work = os.path.join(root, "work")
    code_path = os.path.join(root, "code.py")  # outside the working directory: the code cannot rewrite it
    env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env["PYTHONHASHSEED"] = "0"  # the same hashes (set order) in every run
    argv = [sys.executable, "-s", "-S", "-P", "-B", "-X", "utf8", "-c", _BOOTSTRAP, code_path, work]
    start = time.monotonic()
    argv += [json.dumps(limits), repr(start + _flush_time(timeout_s))]
    timed_out = False
    proc = None
    try:
        os.mkdir(work)
        with open(code_path, "w", encoding="utf-8", errors="replace") as f:  # a lone surrogate becomes "?"
            f.write(code)
        proc = subprocess.Popen(
            argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
        out, err = _Head(max_output_chars), _Tail(max_output_chars)
        readers = [_drain(proc.stdout, out), _drain(proc.stderr, err)]
        cpu_used = _wait(proc, timeout_s)
        if cpu_used is None:
            timed_out = True
            cpu_used = _kill_group(proc)
        for reader in readers:
            reader.join(1.0)
        seconds = time.monotonic() - start
    finally:
        if proc is not None and proc.returncode is None:  # interrupted in the parent while the code ran
            _kill_group(proc)
        _remove_tree(root)
    status = proc.returncode
    stderr_text = err.text()
    return SandboxResult(
        stdout=out.text(),
        stderr=stderr_text,
        exit_status=status,
        timed_out=timed_out,
        memory_exceeded=status == MEMORY_EXIT_STATUS and stderr_text.rstrip("\n").endswith(MEMORY_NOTE),
        cpu_exceeded=not timed_out and _cpu_limit_kill(status, cpu_used, limits["RLIMIT_CPU"]),
        output_truncated=out.dropped > 0 or err.dropped > 0,
        seconds=seconds,
        cpu_seconds=cpu_used,
    )


def _cpu_limit_kill(status: int | None, cpu_used: float, cpu_limit: int) -> bool:
    """Whether RLIMIT_CPU ended the run: SIGXCPU at the soft limit (SIGKILL at the hard one, soft + 1)
    with that much CPU time used. A SIGKILL or SIGXCPU with less comes from elsewhere: the system's
    out-of-memory killer, a kill by the code itself."""
    killed = status in (-signal.SIGXCPU, -signal.SIGKILL)
    return killed and cpu_used >= cpu_limit - _CPU_SLACK_S


class _Head:
    """The first `limit` characters of a stream, counting what was dropped."""

    def __init__(self, limit: int) -> None:
        self.limit, self.parts, self.size, self.dropped = limit, [], 0, 0

    def add(self, chunk: str) -> None:
        keep = chunk[: max(0, self.limit - self.size)]
        self.parts.append(keep)
        self.size += len(keep)
        self.dropped += len(chunk) - len(keep)

    def text(self) -> str:
        body = "".join(self.parts)
        return body + (f"\n... [output truncated: {self.dropped} more characters]" if self.dropped else "")


class _Tail(_Head):
    """The last `limit` characters of a stream (a traceback ends there)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.chars: deque[str] = deque(maxlen=limit)
        self.total = 0

    def add(self, chunk: str) -> None:
        self.chars.extend(chunk)
        self.total += len(chunk)
        self.dropped = max(0, self.total - self.limit)

    def text(self) -> str:
        body = "".join(self.chars)
        return (f"[... {self.dropped} earlier characters cut]\n" if self.dropped else "") + body


def _drain(stream: IO[bytes], sink: _Head) -> threading.Thread:
    """Read `stream` to its end in a thread (so a chatty child never blocks on a full pipe)."""

    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
        with stream:
            while chunk := stream.read1(65536):
                sink.add(decoder.decode(chunk))
            sink.add(decoder.decode(b"", final=True))

    thread = threading.Thread(target=read, daemon=True, name="sandbox-output")
    thread.start()
    return thread


def _flush_time(timeout_s: float) -> float:
    """Seconds after the start at which the child flushes what it printed: a little before the kill at
    `timeout_s`, so that a run killed at the time limit still shows the output it had buffered."""
    return max(timeout_s - min(0.1, timeout_s / 4), timeout_s / 2)


def _wait(proc: subprocess.Popen, timeout_s: float) -> float | None:
    """Wait up to `timeout_s` for the code's process to end; reap it (setting proc.returncode) and return
    the CPU seconds it used, or None if it still runs. Polls as Popen.wait does, through os.wait4,
    which also gives the child's resource usage (getrusage(RUSAGE_CHILDREN) would mix in every other
    child of the trainer, reward and tool calls running beside this one)."""
    deadline, delay = time.monotonic() + timeout_s, 0.0005
    while True:
        used = _reap(proc, os.WNOHANG)
        remaining = deadline - time.monotonic()
        if used is not None or remaining <= 0:
            return used
        delay = min(delay * 2, remaining, 0.05)
        time.sleep(delay)


def _reap(proc: subprocess.Popen, flags: int) -> float | None:
    """One os.wait4 of the code's process: the CPU seconds it used once it ended (proc.returncode set),
    None while it runs (flags=os.WNOHANG)."""
    if proc.returncode is not None:
        return 0.0
    try:
        pid, status, usage = os.wait4(proc.pid, flags)
    except ChildProcessError:  # SIGCHLD ignored in this process: the child is gone, its status with it
        proc.returncode = 0  # what Popen.wait reports then
        return 0.0
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _kill_group(proc: subprocess.Popen) -> float:
    """SIGKILL the code's whole process group (children it may have started too), reap it and return
    the CPU seconds it used."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return _reap(proc, 0) or 0.0


def _remove_tree(root: str) -> None:
    """Remove the run's folder, even where the code took permissions away from its own files."""

    def retry(function, path, _exc) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), stat.S_IRWXU)
            os.chmod(path, stat.S_IRWXU)
            function(path)

    shutil.rmtree(root, onerror=retry)  # onerror: deprecated in 3.12 in favour of onexc, still supported
    if os.path.exists(root):
        shutil.rmtree(root, ignore_errors=True)
