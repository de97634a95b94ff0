"""Which run a workdir belongs to: its recipe, model and trainable set, recorded in WORKDIR/run.json.

A workdir's checkpoint resumes only the run that wrote it. Resuming it with another recipe (say NVLM-X SFT
in the workdir of NVLM-X pretraining) would either do nothing ("the checkpoint is at step 20 >= total_steps")
or restore an optimizer state built for other trainable parameters and fail deep inside jit with a pytree
mismatch. The trainer calls `claim` before it writes or restores anything, and a different run is refused
with a message that says what each run is and how to start the new stage from the old one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvlm_jax.checkpoint.orbax_checkpoint import CHECKPOINT_SUBDIR

RUN_FILE = "run.json"


class RunIdentityError(RuntimeError):
  """The workdir holds checkpoints of a different run."""


def recipe_name(config_flag: str) -> str:
  """The recipe a --config flag names: 'configs/nvlm_x_72b_pretrain.py:runlocal' -> 'nvlm_x_72b_pretrain:runlocal'."""
  path, _, arg = config_flag.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return f"{name}:{arg}" if arg else name


def identity_of(config) -> dict:
  """{recipe, model, trainable} of a training config (`recipe`: what train.py was given, e.g.
  "nvlm_x_72b_pretrain:runlocal"; "" when the config was built in code)."""
  model = config.model.get("preset", "") or "decoder"
  return {"recipe": config.get("recipe", ""), "model": model, "trainable": sorted(config.trainable)}


def _has_checkpoints(workdir: Path) -> bool:

  directory = workdir / CHECKPOINT_SUBDIR
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _differences(recorded: dict, current: dict) -> list[str]:
  out = []
  for key in ("recipe", "model", "trainable"):
    a, b = recorded.get(key), current.get(key)
    if key == "recipe" and not (a and b):  # a run started in code names no recipe: nothing to compare
      continue
    if a != b:
      out.append(f"{key}: the workdir's run has {a!r}, this run has {b!r}")
  return out


def claim(workdir: str | os.PathLike, config, *, write: bool = True) -> None:
  """Refuses a workdir whose checkpoints belong to a different run; otherwise records this run's identity
  (`write`: process 0 only)."""
  workdir = Path(workdir)
  current = identity_of(config)
  file = workdir / RUN_FILE
  if file.is_file() and _has_checkpoints(workdir):
    recorded = json.loads(file.read_text())
    differences = _differences(recorded, current)
    if differences:
      lines = "\n  ".join(differences)
      raise RunIdentityError(
        f"{workdir} holds the checkpoints of a different run ({file}):\n  {lines}\n"
        f"Resuming them would mix two runs. Train this one in a new workdir (--config.workdir=DIR); to start "
        f"it from that run's weights, add --config.checkpoint.init_from={workdir}."
      )
  if write:
    workdir.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(current, indent=2) + "\n")
