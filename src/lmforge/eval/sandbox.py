"""Run untrusted Python (a model's code and its tests) in a child process that cannot do much harm.

Generated code is untrusted: it may loop forever, eat the machine's memory, delete files or
talk to the network, by accident or not. Each program runs as its own ``python -I -B``
process (isolated mode: no PYTHON* variables, no user site-packages, the script's folder
and not the working directory on sys.path; no bytecode written), in a fresh temporary
directory that is its working directory and its HOME, with an environment of PATH and
HOME only (no proxies, no credentials), in a new session whose process group is killed
when it is over, and under these layers:

1. **Resource limits** (`setrlimit` in the child before exec): address space
   (``memory_mb``: a memory bomb gets MemoryError), CPU seconds, the size of any file it
   writes (``file_mb``, its stdout/stderr included: they go to files), processes
   (RLIMIT_NPROC), no core dumps; and a wall-clock timeout (a sleeping or blocked program
   uses no CPU) after which the whole process group is killed.
2. **Another user**: run as root (as in CI), the child drops to ``nobody`` (uid/gid
   65534, no supplementary groups) before exec, so it can write only where anyone may
   (its directory is handed to nobody); RLIMIT_NPROC then counts nobody's processes only.
   Run as an ordinary user, it stays that user.
3. **No network**: where ``unshare -rn`` works (a user namespace with a network namespace
   of its own: no interface but a downed loopback), the child runs inside it; checked
   once per process (`sandbox_setup`). Where it does not, the network is open to the
   child at the operating-system level and only layer 4 stands in the way.
4. **An audit hook** (PEP 578), installed by a runner before the program is executed and
   impossible to remove from Python: it refuses opening a file for writing, and removing,
   renaming, linking or changing files, outside the temporary directory; creating or
   connecting sockets; starting processes (subprocess, os.system, exec*, spawn*, fork);
   and loading C libraries through ctypes (with which code could get around the hook).
   The program passes only if it runs to its end and the runner then prints a nonce: a
   program that calls ``sys.exit(0)`` before its tests have run does not pass.

Not isolated: reading files (the program can read whatever ``nobody`` may read: the
Python installation, world-readable files); CPU time and memory shared with the rest
of the machine up to the limits; C extensions already importable that do their own I/O
(numpy's ``tofile``, say) write past the hook, though not past the user and file-size
limits; and the kernel itself (no seccomp filter, no container). For code from people
you do not trust, add a container or a VM around the whole evaluation.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Execution", "Limits", "Setup", "run_programs", "run_sandboxed", "sandbox_setup"]

NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    seconds: float = 10.0  # wall clock; CPU time is capped at the same (rounded up)
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write (stdout and stderr included)
    processes: int = 64  # RLIMIT_NPROC (counts the user's processes: nobody's, when run as root)

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.memory_mb < 64 or self.file_mb < 1 or self.processes < 1:
            raise ValueError(f"sandbox limits out of range: {self} (seconds > 0, memory_mb >= 64, "
                             f"file_mb >= 1, processes >= 1)")


@dataclass(frozen=True)
class Execution:
    """How one program ended: "passed" (ran to its end), "failed" (an exception or a nonzero
    exit), "timeout" (killed at the wall-clock limit) or "killed" (ended by a signal)."""

    status: str
    returncode: int | None
    seconds: float
    stderr: str  # its last 2,000 characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The runner: installs the audit hook, then runs program.py as __main__, then prints the nonce.
# It is Python source, run by the child; ROOT and NONCE are replaced by the repr()s of their values.
_RUNNER = '''\
import os, sys

def _guard(root):
    root = os.path.realpath(root)
    refused = {"subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg",
               "pty.spawn", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
               "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.addressof",
               "sys.addaudithook"}
    refused_prefixes = ("os.exec", "os.spawn", "os.posix_spawn", "_posixsubprocess")
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                   "os.truncate": 1, "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
                   "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copymode": 2, "shutil.copystat": 2,
                   "shutil.move": 2, "os.mkfifo": 1, "os.mknod": 1, "os.chflags": 1, "os.lchflags": 1}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fspath, join, sep = os.path.realpath, os.fsdecode, os.path.join, os.sep

    def inside(path):
        if isinstance(path, int):
            return True  # an already open file descriptor
        full = realpath(join(root, fspath(path)))
        return full == root or full.startswith(root + sep)

    def refuse(event, detail=""):
        raise PermissionError(f"sandbox: {event} {detail}is not allowed")

    def hook(event, args):
        if event in refused or event.startswith(refused_prefixes):
            refuse(event)
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
                (isinstance(flags, int) and flags & write_flags)
            if writing and path is not None and not inside(path):
                refuse("writing", f"to {path!r} ")
        elif event in path_events:
            for path in args[:path_events[event]]:
                if path is not None and not inside(path):
                    refuse(event, f"on {path!r} ")

    sys.addaudithook(hook)

_guard(ROOT)
del _guard
with open("program.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "program.py", "exec")
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
print(NONCE, flush=True)
'''


def _preexec(limits: Limits):
    cpu = int(limits.seconds) + 1

    def limit() -> None:  # runs in the child, after fork (and after the drop to nobody), before exec
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return limit


@dataclass(frozen=True)
class Setup:
    """How this machine's sandboxes run: the interpreter, as whom, and whether in a network namespace."""

    python: str
    user: str  # "nobody" or "self"
    network_isolated: bool

    def popen_user(self) -> dict:
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if self.user == "nobody" else {}


_SETUP: list[Setup] = []


def sandbox_setup() -> Setup:
    """Found once per process: as root, an interpreter that nobody may run (this one, else the
    system's python3; a virtual environment under /root is not readable by nobody: the programs
    need only the standard library); `unshare -rn` if it works for that user."""
    if _SETUP:
        return _SETUP[0]

    def works(command: list[str], user: dict) -> bool:
        try:
            return subprocess.run(command, capture_output=True, timeout=20, **user).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    probe = ["-I", "-c", "import sys; sys.exit(sys.version_info < (3, 8))"]  # audit hooks: 3.8
    python, user = sys.executable, {}
    if os.geteuid() == 0:
        candidates = [sys.executable, shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"]
        found = next((c for c in candidates if c and works([c, *probe], nobody)), None)
        if found:
            python, user = found, nobody
    unshare = shutil.which("unshare")
    network = bool(unshare) and works([unshare, "-rn", python, *probe], user)
    _SETUP.append(Setup(python, "nobody" if user else "self", network))
    return _SETUP[0]


class _Run:
    """One program: its directory, files and process."""

    def __init__(self, program: str, limits: Limits) -> None:
        self.limits = limits
        self.folder = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
        self.nonce = secrets.token_hex(16)
        (self.folder / "program.py").write_text(program, encoding="utf-8")
        runner = _RUNNER.replace("ROOT)", f"{str(self.folder)!r})").replace("NONCE,", f"{self.nonce!r},")
        (self.folder / "runner.py").write_text(runner, encoding="utf-8")
        setup = sandbox_setup()
        if setup.user == "nobody":
            for path in (self.folder, self.folder / "program.py", self.folder / "runner.py"):
                os.chown(path, NOBODY, NOBODY)
        command = [setup.python, "-I", "-B", "runner.py"]
        if setup.network_isolated:
            command = [shutil.which("unshare") or "unshare", "-rn", *command]
        self.stdout = open(self.folder / ".stdout", "wb")  # noqa: SIM115 (closed in finish)
        self.stderr = open(self.folder / ".stderr", "wb")  # noqa: SIM115
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=self.stdout, stderr=self.stderr,
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.folder), "TMPDIR": str(self.folder)},
            close_fds=True, start_new_session=True, preexec_fn=_preexec(limits), **setup.popen_user())

    def overdue(self) -> bool:
        return time.monotonic() - self.started > self.limits.seconds

    def finish(self, timed_out: bool) -> Execution:
        if timed_out or self.process.poll() is None:
            self._kill()
        returncode = self.process.wait()
        self._kill()  # anything it left behind in its process group
        seconds = time.monotonic() - self.started
        self.stdout.close()
        self.stderr.close()
        out = (self.folder / ".stdout").read_bytes()
        err = (self.folder / ".stderr").read_bytes()[-2000:].decode("utf-8", "replace")
        shutil.rmtree(self.folder, ignore_errors=True)
        if timed_out:
            status = "timeout"
        elif returncode < 0:
            status = "killed"
        elif returncode == 0 and self.nonce.encode() in out:
            status = "passed"
        else:
            status = "failed"
        return Execution(status, returncode, seconds, err)

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def run_programs(programs: Sequence[str], *, limits: Limits = Limits(), workers: int | None = None,
                 progress=None) -> list[Execution]:
    """Run each program in its own sandbox, `workers` at a time (default: the CPU count), from this
    thread alone (no thread pool: forking from several threads at once is what `preexec_fn` must
    not meet)."""
    workers = max(1, workers or os.cpu_count() or 1)
    results: list[Execution | None] = [None] * len(programs)
    running: dict[int, _Run] = {}
    waiting = list(range(len(programs)))[::-1]
    done = 0
    while waiting or running:
        while waiting and len(running) < workers:
            i = waiting.pop()
            running[i] = _Run(programs[i], limits)
        for i, run in list(running.items()):
            overdue = run.overdue()
            if run.process.poll() is not None or overdue:
                results[i] = run.finish(timed_out=overdue and run.process.poll() is None)
                del running[i]
                done += 1
                if progress is not None:
                    progress(done, len(programs))
        if running:
            time.sleep(0.005)
    return [r for r in results if r is not None]


def run_sandboxed(program: str, *, limits: Limits = Limits()) -> Execution:
    """Run one program (see the module docstring)."""
    return run_programs([program], limits=limits, workers=1)[0]
