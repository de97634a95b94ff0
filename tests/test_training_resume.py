"""Preemption: SIGKILL train.py (after a checkpoint, or at each phase of a checkpoint save), rerun the same
command, get the same losses exactly.

The killed run leaves finished checkpoints (and possibly a half-written one); the rerun restores params,
optimizer state, step counters, RNG and the grain iterator position from the newest finished one, and
metrics.jsonl must then read exactly like the metrics of a run that was never interrupted: every step once,
loss, gradient norm and learning rate bit-identical. One uninterrupted reference run serves every test.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOTAL, EVERY = 30, 5
KILL_STEP = 2 * EVERY  # the second interval checkpoint: an earlier one exists to fall back on


def train_flags(workdir: Path) -> list[str]:
  return [
    "--config",
    str(REPO / "configs" / "tiny_lm.py"),
    f"--config.workdir={workdir}",
    f"--config.total_steps={TOTAL}",
    f"--config.checkpoint.every_steps={EVERY}",
    "--config.log.every_steps=1",
    "--config.log.tensorboard=False",
  ]


def train_command(workdir: Path) -> list[str]:
  return [sys.executable, str(REPO / "train.py")] + train_flags(workdir)


def subprocess_env(cache_dir: Path) -> dict:
  env = dict(os.environ)
  # One CPU device (not conftest's 8) and fast compiles; a shared compilation cache across the runs.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run(command: list[str], env: dict, log: Path, timeout: float = 300) -> tuple[int, str]:
  """Runs to the end (or its own death), output to `log`; the child is killed and reaped whatever happens."""
  with open(log, "w") as out:
    proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      proc.wait(timeout=timeout)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return proc.returncode, log.read_text()


def read_losses(workdir: Path) -> dict[int, tuple]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"metrics.jsonl steps are not one clean run: {steps}"
  return {r["step"]: (r["loss"], r["grad_norm"], r["learning_rate"]) for r in rows}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return subprocess_env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  root = tmp_path_factory.mktemp("reference")
  code, out = run(train_command(root / "run"), env, root / "log.txt")
  assert code == 0, out[-3000:]
  losses = read_losses(root / "run")
  assert sorted(losses) == list(range(1, TOTAL + 1))
  return losses


def rerun_matches(reference, env, workdir: Path, log: Path, resumed_at: int) -> None:
  code, out = run(train_command(workdir), env, log)
  assert code == 0, out[-3000:]
  assert f"resumed from {workdir / 'checkpoints'}/{resumed_at} " in out, out[-3000:]
  assert read_losses(workdir) == reference  # every step: loss, grad norm and learning rate bit-identical


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_matches_an_uninterrupted_run(reference, env, tmp_path):
  workdir = tmp_path / "run"
  with open(tmp_path / "killed.txt", "w") as out:
    proc = subprocess.Popen(train_command(workdir), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      first_checkpoint = workdir / "checkpoints" / str(EVERY)
      deadline = time.time() + 240
      while not first_checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=30)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert proc.returncode == -signal.SIGKILL, "train.py finished before it could be killed; raise TOTAL"
  killed_at = max(read_losses(workdir))
  assert EVERY <= killed_at < TOTAL, killed_at
  rerun_matches(reference, env, workdir, tmp_path / "rerun.txt", resumed_at=EVERY)


PHASES = ("before_save", "mid_items", "before_commit", "after_commit")


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_phase_of_a_checkpoint_save_then_rerun_matches(reference, env, tmp_path, phase):
  workdir = tmp_path / "run"
  command = [sys.executable, str(REPO / "tests" / "kill_train.py"), phase, str(KILL_STEP)] + train_flags(workdir)
  code, out = run(command, env, tmp_path / "killed.txt")
  assert code == -signal.SIGKILL, f"not killed at {phase}: {out[-3000:]}"
  checkpoints = workdir / "checkpoints"
  committed = (checkpoints / str(KILL_STEP)).is_dir()
  assert committed == (phase == "after_commit"), sorted(p.name for p in checkpoints.iterdir())
  if phase in ("mid_items", "before_commit"):  # the half-written step is left under its temporary name
    assert any(p.name.startswith(f"{KILL_STEP}.orbax-checkpoint-tmp") for p in checkpoints.iterdir())
  # The rows of every step up to the killed checkpoint were on disk before it could commit.
  assert max(read_losses(workdir)) >= KILL_STEP
  # Resumes from the newest committed step: KILL_STEP after its commit, else an earlier one (EVERY, or step 1
  # if the asynchronous save of EVERY had not committed yet either).
  newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert newest == KILL_STEP if phase == "after_commit" else newest < KILL_STEP
  rerun_matches(reference, env, workdir, tmp_path / "rerun.txt", resumed_at=newest)
