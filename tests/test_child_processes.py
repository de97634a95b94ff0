"""The subprocess helper the multi-process tests rely on: a child never outlives a failing test."""

import os
import sys
import time

import child_processes
import pytest

SLEEPER = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"]


def gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  return False


def test_a_failing_block_stops_and_reaps_its_child(tmp_path):
  with (
    pytest.raises(RuntimeError, match="the test failed"),
    child_processes.running(SLEEPER, tmp_path / "s.log") as proc,
  ):
    raise RuntimeError("the test failed")
  assert proc.returncode is not None and gone(proc.pid)  # reaped: not even a zombie keeps the pid


def test_a_timeout_kills_the_child_and_reports_its_output(tmp_path):
  log = tmp_path / "sleeper.log"
  with child_processes.running(SLEEPER, log) as proc:
    deadline = time.monotonic() + 120
    while "started" not in log.read_text() and time.monotonic() < deadline:
      time.sleep(0.05)
    with pytest.raises(AssertionError, match="still ran after 1 s; output:\nstarted"):
      child_processes.wait(proc, log, timeout_s=1)
    assert proc.returncode is not None
  assert gone(proc.pid)
