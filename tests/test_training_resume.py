"""Preemption: SIGKILL train.py after a checkpoint, rerun the same command, get the same losses exactly.

The killed run leaves finished checkpoints (and possibly a half-written one); the rerun restores params,
optimizer state, step counters, RNG and the grain iterator position from the latest finished one, and
metrics.jsonl must then read exactly like the metrics of a run that was never interrupted.
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
TOTAL, EVERY = 60, 10


def train_command(workdir: Path) -> list[str]:
  return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_lm.py"),
          f"--config.workdir={workdir}", f"--config.total_steps={TOTAL}",
          f"--config.checkpoint.every_steps={EVERY}", "--config.log.every_steps=1",
          "--config.log.tensorboard=False"]


def subprocess_env(cache_dir: Path) -> dict:
  env = dict(os.environ)
  # One CPU device (not conftest's 8) and fast compiles; a shared compilation cache across the runs.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def read_losses(workdir: Path) -> dict[int, tuple]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"metrics.jsonl steps are not one clean run: {steps}"
  return {r["step"]: (r["loss"], r["grad_norm"], r["learning_rate"]) for r in rows}


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_matches_an_uninterrupted_run(tmp_path):
  env = subprocess_env(tmp_path / "jax_cache")
  reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
  subprocess.run(train_command(reference_dir), env=env, check=True, capture_output=True, timeout=300)
  reference = read_losses(reference_dir)
  assert sorted(reference) == list(range(1, TOTAL + 1))

  proc = subprocess.Popen(train_command(resumed_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  first_checkpoint = resumed_dir / "checkpoints" / str(EVERY)
  deadline = time.time() + 240
  while not first_checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL, "train.py finished before it could be killed; raise TOTAL"
  killed_at = max(read_losses(resumed_dir))
  assert EVERY <= killed_at < TOTAL, killed_at

  rerun = subprocess.run(train_command(resumed_dir), env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "resumed from" in rerun.stdout
  resumed = read_losses(resumed_dir)
  assert resumed == reference  # every step: loss, grad norm and learning rate bit-identical
