"""Training metrics: one JSON line per step in WORKDIR/metrics.jsonl, TensorBoard scalars, progress lines.

Only process 0 writes. On resume from a checkpoint at step s, lines for steps > s (written after that
checkpoint by the interrupted run) are dropped first, so metrics.jsonl always reads as one clean run,
and TensorBoard is told to discard its later events too (a START session log at step s).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

from nvlm_jax.training.tensorboard import EventWriter

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops lines with step > last_step (an interrupted run's steps that will be redone)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  kept = [m for m in read_metrics(workdir) if m.get("step", 0) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(m) + "\n" for m in kept)
  os.replace(tmp, path)


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      truncate_metrics(workdir, resume_step)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
    if tensorboard:
      self._tb = EventWriter(os.path.join(workdir, "tensorboard"), resume_step=resume_step)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      self._tb.scalars(step, {f"train/{k}": v for k, v in clean.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)})

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _plain(v):
  try:
    import numpy as np
    if isinstance(v, np.ndarray) or isinstance(v, np.generic):
      v = v.item()
  except ImportError:
    pass
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep it readable ("nan", "inf")
  return v


def progress_line(step: int, total: int, loss: float, tokens_per_s: float, step_seconds: float,
                  extra: str = "") -> str:
  eta = format_duration((total - step) * step_seconds)
  """`loss`: the mean over the steps since the previous line."""
  return (f"step {step:>6d}/{total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
          f"{step_seconds * 1000:.0f} ms/step | ETA {eta}{extra}")


def log_progress(line: str) -> None:
  print(line, flush=True)


class Stopwatch:
  def __init__(self):
    self.t = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    dt, self.t = now - self.t, now
    return dt
