"""Run untrusted Python programs (model-written code) in separate, resource-limited processes.

Nothing generated is ever executed in the evaluating process. Each program runs as
``python -I -B prog.py`` (isolated mode: no user site, no PYTHON* variables, no cwd on sys.path)
in its own temporary working directory, in a new session so that the whole process group can be
killed, with a minimal environment, stdin closed and, set by `preexec_fn` before exec:

* RLIMIT_CPU   - CPU seconds (the kernel sends SIGXCPU, then SIGKILL);
* RLIMIT_AS    - address space, so a huge allocation fails with MemoryError instead of swapping;
* RLIMIT_CORE  - 0: no core files;
* RLIMIT_FSIZE - largest file the program may write;
* RLIMIT_NOFILE - open file descriptors;
* RLIMIT_NPROC - optional (off by default: it counts every process of the user, not only ours).

A wall-clock deadline backs up the CPU limit (sleeping or blocked programs use no CPU). Programs run
concurrently, all launched from the calling thread (no worker threads, so `preexec_fn` is safe), with
stdout/stderr going to files, not pipes, so a chatty program cannot block on a full pipe.

Like OpenAI's human-eval harness (`human_eval/execution.py::reliability_guard`), a short prelude
disables the most destructive os/shutil/subprocess functions inside the child. This is a guard
against accidents, not a security boundary: run evaluations of untrusted models in a container.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

PASSED, FAILED, TIMEOUT = "passed", "failed", "timeout"

_GUARD_PRELUDE = """\
import builtins as _b, os as _os, shutil as _sh, subprocess as _sp
for _name in ("kill", "killpg", "system", "fork", "forkpty", "putenv", "unsetenv", "remove", "unlink",
              "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown",
              "fchmod", "fchown", "lchown", "setuid", "setgid", "chroot", "execv", "execve", "spawnv"):
    if hasattr(_os, _name):
        setattr(_os, _name, None)
for _name in ("rmtree", "move", "chown"):
    setattr(_sh, _name, None)
_sp.Popen = None
del _b, _os, _sh, _sp, _name
"""


@dataclasses.dataclass(frozen=True)
class ExecutionLimits:
  timeout_s: float = 3.0  # wall clock
  cpu_s: int | None = None  # default: int(timeout_s) + 2
  memory_bytes: int = 1 << 30
  file_size_bytes: int = 16 << 20
  open_files: int = 256
  processes: int | None = None
  guard: bool = True  # prepend the reliability prelude


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  status: str  # PASSED (exit code 0), FAILED (non-zero exit or killed by a signal), TIMEOUT
  returncode: int | None
  stdout_tail: str
  stderr_tail: str
  duration_s: float

  @property
  def passed(self) -> bool:
    return self.status == PASSED


def _limit_setter(limits: ExecutionLimits):
  cpu = limits.cpu_s if limits.cpu_s is not None else int(limits.timeout_s) + 2

  def set_limits() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    if limits.processes is not None:
      resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))

  return set_limits


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _tail(path: str, max_chars: int = 2000) -> str:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - max_chars))
    return f.read().decode("utf-8", errors="replace")


@dataclasses.dataclass
class _Running:
  index: int
  process: subprocess.Popen
  workdir: tempfile.TemporaryDirectory
  started: float


def _launch(index: int, program: str, limits: ExecutionLimits) -> _Running:
  workdir = tempfile.TemporaryDirectory(prefix="nvlm_eval_exec_")
  path = os.path.join(workdir.name, "program.py")
  with open(path, "w", encoding="utf-8") as f:
    f.write((_GUARD_PRELUDE if limits.guard else "") + program)
  env = {"PATH": "/usr/bin:/bin", "HOME": workdir.name, "TMPDIR": workdir.name, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
  with (
    open(os.path.join(workdir.name, "stdout.txt"), "wb") as out,
    open(os.path.join(workdir.name, "stderr.txt"), "wb") as err,
  ):
    process = subprocess.Popen(
      [sys.executable, "-I", "-B", path],
      cwd=workdir.name,
      env=env,
      stdin=subprocess.DEVNULL,
      stdout=out,
      stderr=err,
      preexec_fn=_limit_setter(limits),
      start_new_session=True,
      close_fds=True,
    )
  return _Running(index, process, workdir, time.monotonic())


def run_python_programs(
  programs: Sequence[str], limits: ExecutionLimits = ExecutionLimits(), max_parallel: int | None = None
) -> list[ExecutionResult]:
  """Run every program in its own sandboxed process, up to `max_parallel` at a time (default: CPUs)."""
  max_parallel = max(1, max_parallel or os.cpu_count() or 1)
  results: list[ExecutionResult | None] = [None] * len(programs)
  pending = list(range(len(programs)))[::-1]
  running: list[_Running] = []
  try:
    while pending or running:
      while pending and len(running) < max_parallel:
        index = pending.pop()
        running.append(_launch(index, programs[index], limits))
      still_running = []
      for job in running:
        elapsed = time.monotonic() - job.started
        returncode = job.process.poll()
        if returncode is None and elapsed <= limits.timeout_s:
          still_running.append(job)
          continue
        _kill_group(job.process)  # also reaps anything the program left behind
        if returncode is None:
          job.process.wait()
          status = TIMEOUT
        elif returncode == -signal.SIGXCPU:
          status = TIMEOUT  # CPU-seconds limit
        else:
          status = PASSED if returncode == 0 else FAILED
        results[job.index] = ExecutionResult(
          status,
          returncode,
          _tail(os.path.join(job.workdir.name, "stdout.txt")),
          _tail(os.path.join(job.workdir.name, "stderr.txt")),
          elapsed,
        )
        job.workdir.cleanup()
      running = still_running
      if running:
        time.sleep(0.01)
  finally:
    for job in running:  # only on an exception (e.g. KeyboardInterrupt)
      _kill_group(job.process)
      job.process.wait()
      job.workdir.cleanup()
  return results  # type: ignore[return-value]


def run_python_program(program: str, limits: ExecutionLimits = ExecutionLimits()) -> ExecutionResult:
  return run_python_programs([program], limits, max_parallel=1)[0]
