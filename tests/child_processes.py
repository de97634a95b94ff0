"""Child processes for tests: output to a file, killed and reaped whatever happens, generous timeouts.

A test that fails (assertion, timeout, Ctrl-C) must not leave a training process running on the shared
cores, and a child's output must survive for the failure message without filling a pipe buffer.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**overrides: str) -> dict:
  """os.environ without conftest's 8-device XLA_FLAGS (children get one CPU device unless told otherwise), with the
  repository importable, plus `overrides`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env.update(overrides)
  return env


def tail(log: Path, chars: int = 4000) -> str:
  return log.read_text(errors="replace")[-chars:] if log.exists() else f"(no output file {log})"


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
  """Terminates `proc` if it still runs, kills it after `grace_s`, and reaps it (no zombie is left)."""
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
      proc.kill()
  proc.wait()


@contextlib.contextmanager
def running(command: Sequence[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
  """Popen with stdout+stderr to `log`; the child is stopped and reaped when the block exits, however it exits."""
  with open(log, "wb") as out:
    proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
      yield proc
    finally:
      stop(proc)


def wait(proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
  """The child's exit code; on timeout the child is killed and the test fails with its output."""
  try:
    return proc.wait(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    stop(proc)
    raise AssertionError(f"{proc.args!r} still ran after {timeout_s:.0f} s; output:\n{tail(log)}") from None


def run(command: Sequence[str], log: Path, env: dict | None = None, timeout_s: float = 600) -> int:
  """Runs `command` to completion (output in `log`); returns its exit code."""
  with running(command, log, env) as proc:
    return wait(proc, log, timeout_s)


def python(*args: str) -> list[str]:
  return [sys.executable, *args]
