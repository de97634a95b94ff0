"""Training metrics: one JSON line per step in WORKDIR/metrics.jsonl, TensorBoard scalars, progress lines.

Only process 0 writes. On resume from a checkpoint at step s, a torn last line and lines for steps > s
(written after that checkpoint by the interrupted run) are dropped first, so metrics.jsonl reads as one clean
run: every step exactly once. The trainer writes the rows of every step up to a checkpoint to disk (fsync)
before it starts that checkpoint.

TensorBoard event files are written by tensorboardX and never edited: a resumed run opens a new event file
with `purge_step=s + 1`, a START session log at that step, on which TensorBoard hides the events earlier
files hold at steps >= s + 1 (what the interrupted run logged after the checkpoint; this run logs those
steps again). A torn last record in an old file (a kill mid-write) is left; TensorBoard's reader stops there.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from typing import Any, Mapping

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
  """metrics.jsonl has an unreadable line that is not its last one (a torn last line is expected after a kill)."""


def _parse_rows(path: str) -> tuple[list[dict], bool]:
  """(rows, whether a torn last line was dropped). A kill mid-write leaves the last line without its newline
  and incomplete; any other unreadable line is an error naming the file and line."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  rows, torn = [], False
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode("utf-8"))
      problem = None if isinstance(row, dict) and isinstance(row.get("step"), int) else "no integer 'step'"
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      problem = str(e)
    if problem is None:
      rows.append(row)
    elif number == len(lines):  # no newline after it: the line was being written when the run died
      torn = True
    else:
      raise MetricsFileError(f"{path}, line {number}: unreadable metrics row ({problem})")
  return rows, torn


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (a torn last line, left by a kill, is skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  return _parse_rows(path)[0]


def truncate_metrics(workdir: str, last_step: int) -> str:
  """Brings metrics.jsonl to `last_step`, the step a resume restored: drops a torn last line and rows of
  later steps (an interrupted run's steps, to be redone), and keeps one row per step. Returns what it did,
  for the progress log ("" if nothing)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return ""
  rows, torn = _parse_rows(path)
  by_step = {}
  for row in rows:
    if row["step"] <= last_step:
      by_step[row["step"]] = row  # a repeated step (from an older writer) keeps its last row
  kept = [by_step[s] for s in sorted(by_step)]
  if not torn and len(kept) == len(rows):
    return ""
  _atomic_write(path, "".join(json.dumps(m) + "\n" for m in kept))
  done = [f"removed {len(rows) - len(kept)} row(s) past step {last_step}"] if len(kept) != len(rows) else []
  done += ["dropped a torn last line"] if torn else []
  return f"{path}: " + ", ".join(done)


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Appends one row per step; on resume first brings the log (and the TensorBoard run) to the restored step.

  `repaired` lists what the resume changed in the files, for the progress log.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self.repaired: list[str] = []
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    logdir = os.path.join(workdir, "tensorboard")
    if resume_step is not None:
      self.repaired = [m for m in (truncate_metrics(workdir, resume_step),) if m]
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
    if tensorboard:
      # tensorboardX names files by the second and the host only, opening them with "wb": a suffix keeps two
      # writers of one second (a quick resume) apart, in the order TensorBoard reads them (by name).
      suffix = f".{time.time_ns() % 1_000_000_000:09d}.{os.getpid()}"
      # The restored step's events stay; TensorBoard hides the earlier ones at steps >= purge_step.
      purge_step = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(logdir, purge_step=purge_step, flush_secs=30, filename_suffix=suffix)
      (self._tb_file,) = glob.glob(os.path.join(glob.escape(logdir), f"events.out.tfevents.*{suffix}"))

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"train/{k}", v, int(step))

  def flush(self, durable: bool = False) -> None:
    """Hands the rows to the OS; `durable`: also waits until they are on disk (before a checkpoint commits,
    so a checkpoint never holds steps the log lacks)."""
    if self._jsonl is not None:
      self._jsonl.flush()
      if durable:
        os.fsync(self._jsonl.fileno())
    if self._tb is not None:
      self._tb.flush()
      if durable:  # the writer keeps its file object to itself; any descriptor of the file syncs its data
        fd = os.open(self._tb_file, os.O_RDONLY)
        try:
          os.fsync(fd)
        finally:
          os.close(fd)

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


def progress_line(step: int, total: int, loss: float, tokens_per_s: float, step_seconds: float, extra: str = "") -> str:
  eta = format_duration((total - step) * step_seconds)
  """`loss`: the mean over the steps since the previous line."""
  return (
    f"step {step:>6d}/{total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
    f"{step_seconds * 1000:.0f} ms/step | ETA {eta}{extra}"
  )


def log_progress(line: str) -> None:
  print(line, flush=True)
