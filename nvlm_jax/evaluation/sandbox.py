"""Run untrusted Python programs (model-written code) in separate, resource-limited processes.

Nothing generated is ever executed in the evaluating process. Each program gets a fresh temporary
directory and a supervisor process (`sandbox_worker.py`, started as ``python -I -B`` in a new session
with a minimal environment). The supervisor forks the process that runs the program and decides the
result; see its docstring for the protocol. In short:

* a program passes only when executing it returned normally: the success signal is a random token the
  supervisor hands over a pipe the program's source never names, written back by the harness after the
  program's last statement; printing anything, exiting early with status 0 (`sys.exit(0)`,
  `os._exit(0)`) never passes;
* the time limit counts the program, not interpreter start-up: the clock starts when the supervisor
  forks the ready harness (start-up has its own, generous `startup_s` budget, which only guards
  against a supervisor that never starts);
* every process the program starts, including ones that call `setsid`, is killed when it ends (the
  supervisor is a child subreaper and kills all its descendants);
* in the program, Python audit hooks refuse process creation (`os.system`, `subprocess`,
  `os.posix_spawn*`, `os.exec*`, `os.fork`), signals, frame/gc/ctypes introspection and writes outside
  its temporary directory; RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE and RLIMIT_CORE=0
  are set as well.

This protects against accidents and naive cheating, not against a determined attacker: it is not a
security boundary. Run untrusted models' code in a container. Linux only (PR_SET_CHILD_SUBREAPER, /proc).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

PASSED, FAILED, TIMEOUT = "passed", "failed", "timeout"
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_worker.py")


@dataclasses.dataclass(frozen=True)
class ExecutionLimits:
  timeout_s: float = 3.0  # wall clock of the program itself (human-eval's default)
  cpu_s: int | None = None  # default: ceil(timeout_s) + 1
  memory_bytes: int = 1 << 30
  file_size_bytes: int = 16 << 20
  open_files: int = 256
  startup_s: float = 60.0  # interpreter start-up of the supervisor, counted separately
  guard: bool = True  # install the audit hooks (off only to test the process clean-up itself)


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  status: str  # PASSED (ran to its end), FAILED (raised, exited early, killed), TIMEOUT
  returncode: int | None
  stdout_tail: str
  stderr_tail: str
  duration_s: float  # from the fork of the program's process, start-up excluded
  processes_killed: int = 0  # processes still alive when the program ended (itself included)

  @property
  def passed(self) -> bool:
    return self.status == PASSED


@dataclasses.dataclass
class _Running:
  index: int
  process: subprocess.Popen
  workdir: tempfile.TemporaryDirectory
  backstop: float


def _launch(index: int, program: str, limits: ExecutionLimits) -> _Running:
  workdir = tempfile.TemporaryDirectory(prefix="nvlm_eval_exec_")
  sandbox_dir = os.path.join(workdir.name, "sandbox")
  os.mkdir(sandbox_dir)
  program_path = os.path.join(workdir.name, "program.py")
  with open(program_path, "w", encoding="utf-8") as f:
    f.write(program)
  cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
  config = {
    "work_dir": workdir.name,
    "sandbox_dir": sandbox_dir,
    "program_path": program_path,
    "guard": limits.guard,
    "limits": {
      "timeout_s": limits.timeout_s,
      "cpu_s": cpu,
      "memory_bytes": limits.memory_bytes,
      "file_size_bytes": limits.file_size_bytes,
      "open_files": limits.open_files,
    },
  }
  config_path = os.path.join(workdir.name, "config.json")
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  env = {"PATH": "/usr/bin:/bin", "HOME": sandbox_dir, "TMPDIR": sandbox_dir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
  with open(os.path.join(workdir.name, "supervisor_stderr.txt"), "wb") as err:
    process = subprocess.Popen(
      _supervisor_command(config_path),
      cwd=sandbox_dir,
      env=env,
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      stderr=err,
      start_new_session=True,
      close_fds=True,
    )
  backstop = time.monotonic() + limits.startup_s + limits.timeout_s + 15.0
  return _Running(index, process, workdir, backstop)


def _supervisor_command(config_path: str) -> list[str]:
  return [sys.executable, "-I", "-B", _WORKER, config_path]


def _finish(job: _Running, timed_out: bool) -> ExecutionResult:
  if timed_out:  # the supervisor itself hung: kill its group (normally it cleans up after the program)
    try:
      os.killpg(job.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
  stdout, _ = job.process.communicate()
  try:
    report = json.loads(stdout.decode("utf-8").strip().splitlines()[-1])
  except (IndexError, ValueError, UnicodeDecodeError):
    with open(os.path.join(job.workdir.name, "supervisor_stderr.txt"), "rb") as f:
      why = f.read()[-2000:].decode("utf-8", errors="replace")
    reason = "did not start in time" if timed_out else f"failed (exit {job.process.returncode})"
    return ExecutionResult(TIMEOUT if timed_out else FAILED, None, "", f"sandbox supervisor {reason}: {why}", 0.0)
  return ExecutionResult(
    report["status"],
    report["returncode"],
    report["stdout_tail"],
    report["stderr_tail"],
    report["duration_s"],
    report["processes_killed"],
  )


def run_python_programs(
  programs: Sequence[str], limits: ExecutionLimits = ExecutionLimits(), max_parallel: int | None = None
) -> list[ExecutionResult]:
  """Run every program in its own sandbox, up to `max_parallel` at a time (default: CPUs)."""
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
        exited = job.process.poll() is not None
        if not exited and time.monotonic() <= job.backstop:
          still_running.append(job)
          continue
        results[job.index] = _finish(job, timed_out=not exited)
        job.workdir.cleanup()
      running = still_running
      if running:
        time.sleep(0.01)
  finally:
    for job in running:  # only on an exception (e.g. KeyboardInterrupt)
      try:
        os.killpg(job.process.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
      job.process.wait()
      job.workdir.cleanup()
  return results  # type: ignore[return-value]
