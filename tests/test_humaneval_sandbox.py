"""The HumanEval sandbox cannot be fooled into a pass, and leaves nothing running.

A pass needs the harness's out-of-band token after the program's last statement; the program's own
output and exit status never count. Process creation, introspection that could find the token, and
writes outside the sample's directory are refused by audit hooks; processes started anyway (hooks off)
are killed, including ones that detached with setsid.
"""

import os
import sys
import time

import pytest

from nvlm_jax.evaluation import sandbox
from nvlm_jax.evaluation.metrics import humaneval
from nvlm_jax.evaluation.sandbox import FAILED, PASSED, ExecutionLimits, run_python_programs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

LIMITS = ExecutionLimits(timeout_s=30.0, memory_bytes=512 << 20)
PROBLEM = {
  "id": "HumanEval/0",
  "question": 'def add(a, b):\n    """Return a + b."""\n',
  "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
  "entry_point": "add",
}

CHEATS = {
  # Reads its own program file (any marker a harness printed would be there), prints it, exits 0 early.
  "print_and_os_exit": (
    "    import os, sys\n"
    "    print(open(sys.argv[0] if sys.argv[0] else 'program.py').read() if os.path.exists('program.py') else '')\n"
    "    print('passed')\n"
    "    os._exit(0)\n"
  ),
  "system_exit_zero": "    raise SystemExit(0)\n",
  "exit_at_import": "    return 0\nimport sys\nsys.exit(0)\n",
  "walk_frames": "    import sys\n    print(sys._getframe(1).f_locals)\n    return a + b\n",
  "walk_traceback": (
    "    try:\n        raise ValueError\n    except ValueError as e:\n"
    "        print(e.__traceback__.tb_frame.f_back.f_locals)\n    return a + b\n"
  ),
  "gc_objects": "    import gc\n    print([o for o in gc.get_objects() if isinstance(o, bytes)])\n    return a + b\n",
  "ctypes": "    import ctypes\n    return a + b\n",
  "read_proc_mem": "    open('/proc/self/mem', 'rb')\n    return a + b\n",
}


def test_cheating_completions_never_pass():
  completions = ["    return a + b\n", *CHEATS.values()]
  (results,) = humaneval.check_completions([PROBLEM], [completions], LIMITS, max_parallel=4)
  statuses = dict(zip(["honest", *CHEATS], (r.status for r in results)))
  assert statuses == {"honest": PASSED, **{name: FAILED for name in CHEATS}}
  by_name = dict(zip(["honest", *CHEATS], results))
  assert "SystemExit: 0" in by_name["system_exit_zero"].stderr_tail
  assert "sys._getframe is refused" in by_name["walk_frames"].stderr_tail
  assert "tb_frame is refused" in by_name["walk_traceback"].stderr_tail
  assert "gc.get_objects is refused" in by_name["gc_objects"].stderr_tail
  assert "importing ctypes is refused" in by_name["ctypes"].stderr_tail


def test_process_creation_and_outside_writes_are_refused(tmp_path):
  outside = tmp_path / "written_by_sample.txt"
  programs = {
    "os.system": "import os\nos.system('true')\n",
    "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
    "posix_spawn": "import os\nos.posix_spawn('/bin/true', ['true'], {})\n",
    "posix_spawnp": "import os\nos.posix_spawnp('true', ['true'], {})\n",
    "execv": "import os\nos.execv('/bin/true', ['true'])\n",
    "fork": "import os\nos.fork()\n",
    "write_outside": f"open({str(outside)!r}, 'w').write('x')\n",
    "os_open_outside": f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)\n",
    "symlink_escape": f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/x.txt', 'w')\n",
    "remove_outside": f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})\n",
    "write_inside": "open('scratch.txt', 'w').write('x')\nimport tempfile\ntempfile.NamedTemporaryFile().write(b'y')\n",
  }
  (tmp_path / "keep.txt").write_text("keep")
  results = dict(zip(programs, run_python_programs(list(programs.values()), LIMITS, max_parallel=4)))
  assert {name: r.status for name, r in results.items()} == {
    **{name: FAILED for name in programs if name != "write_inside"},
    "write_inside": PASSED,
  }
  for name, result in results.items():
    if name != "write_inside":
      assert "PermissionError: sandbox:" in result.stderr_tail, name
  assert not outside.exists() and not (tmp_path / "x.txt").exists()
  assert (tmp_path / "keep.txt").read_text() == "keep"


DETACHING_PROGRAM = """
import os, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        time.sleep(120)
    os._exit(0)
os.wait()
print(int(os.read(r, 32)))
"""


def test_every_started_process_is_gone_when_the_sample_ends():
  # Hooks off, so the program can start a grandchild that detaches with setsid (a new session and
  # process group, re-parented away from the program): it must still be killed.
  result = run_python_programs([DETACHING_PROGRAM], ExecutionLimits(timeout_s=30.0, guard=False))[0]
  assert result.status == PASSED, result.stderr_tail
  grandchild = int(result.stdout_tail.split()[-1])
  assert result.processes_killed >= 1
  with pytest.raises(ProcessLookupError):
    os.kill(grandchild, 0)


def test_time_limit_does_not_count_interpreter_start_up(monkeypatch):
  # Make start-up take 3 s; a program that runs well inside its 1.5 s limit must still pass.
  original = sandbox._supervisor_command
  monkeypatch.setattr(
    sandbox, "_supervisor_command", lambda path: ["/bin/sh", "-c", 'sleep 3; exec "$@"', "sh", *original(path)]
  )
  started = time.monotonic()
  (result,) = run_python_programs(["import time\ntime.sleep(0.1)\n"], ExecutionLimits(timeout_s=1.5))
  assert time.monotonic() - started >= 3.0
  assert result.status == PASSED, result.stderr_tail
  assert result.duration_s < 1.5
