"""Our checkpoint directory, via orbax: its layout, finding a step, the model description, parameters in and out.

Layout (what the trainer, `convert import|stitch` and `models.save_checkpoint` write)::

    WORKDIR/
      nvlm_model.json            the model description (models.describe_model), for humans and tools
      checkpoints/<step>/        one orbax CheckpointManager step, items:
        params/                  the model parameters (orbax StandardSave, sharded, fp32 master weights)
        model/                   the same model description as JSON (a step directory is self-contained)
        opt_state/, train_meta/, data/, integrity/   the trainer's items (training/checkpointing.py)
      damaged_checkpoints/<step>/  steps found damaged at a resume, moved here for inspection
      metrics.jsonl, tensorboard/ ...

Any of WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/<step> names a checkpoint (`resolve_step`).
Building the model a description names is the registry's job: `models.load_checkpoint(path)` reads the
description here, builds the module, and restores the parameters with `restore_params`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

from nvlm_jax.checkpoint import integrity

CHECKPOINT_SUBDIR = "checkpoints"
MODEL_DESCRIPTION_FILE = "nvlm_model.json"
DESCRIPTION_FORMAT = "nvlm_jax.model/1"


class DamagedCheckpointError(RuntimeError):
  """One checkpoint step cannot be used whole: an item is missing or unreadable, or a checksum differs."""

  def __init__(self, path: Path, reason: str):
    self.path, self.reason = path, reason
    super().__init__(f"checkpoint {path} is damaged: {reason}")


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
  """The steps, ascending, that have parameters in a checkpoints/ directory (none if it does not exist)."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "params").is_dir())


def resolve_step(path: str | os.PathLike, step: int | None) -> tuple[Path, int]:
  """(checkpoint manager directory, step) for a workdir, its checkpoints/ dir, or one step dir."""
  path = Path(path).absolute()
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  elif path.name.isdigit() and (path / "params").is_dir():
    if step is not None and step != int(path.name):
      raise ValueError(f"{path} is the checkpoint of step {path.name}, but step={step} was asked for")
    return path.parent, int(path.name)
  steps = checkpoint_steps(path)
  if not steps:
    raise FileNotFoundError(f"{path}: no nvlm_jax training checkpoint (expected {CHECKPOINT_SUBDIR}/<step>/params)")
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"{path}: no checkpoint for step {step}; available steps {steps}")
  return path, step


def is_training_checkpoint(path: str | os.PathLike) -> bool:
  """True if `path` is a workdir, checkpoints dir or step dir in our layout."""
  try:
    resolve_step(path, None)
    return True
  except (FileNotFoundError, NotADirectoryError):
    return False


def write_model_description(workdir: str | os.PathLike, description: dict) -> None:
  if jax.process_index() == 0:
    path = Path(workdir) / MODEL_DESCRIPTION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(description, indent=2, sort_keys=True))
    tmp.replace(path)


def read_model_description(path: str | os.PathLike, step: int | None = None) -> dict:
  directory, step = resolve_step(path, step)
  model_item = directory / str(step) / "model"
  if model_item.is_dir():
    files = [f for f in model_item.iterdir() if f.suffix == ".json" or f.name == "metadata"]
    for f in files:
      try:
        data = json.loads(f.read_text())
      except (json.JSONDecodeError, UnicodeDecodeError):
        continue
      if isinstance(data, dict) and data.get("format") == DESCRIPTION_FORMAT:
        return data
  workdir_file = directory.parent / MODEL_DESCRIPTION_FILE
  if workdir_file.exists():
    return json.loads(workdir_file.read_text())
  raise FileNotFoundError(f"{directory / str(step)}: no model description (item 'model' or {workdir_file})")


def save_params(
  directory: str | os.PathLike, description: Mapping[str, Any], params: Mapping[str, Any], step: int = 0
) -> Path:
  """Writes params + model description as a workdir with no train state (an init for `init_from`, or a
  model to serve); returns the step directory."""
  directory = Path(directory).absolute()
  write_model_description(directory, dict(description))
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory / CHECKPOINT_SUBDIR, options=options) as manager:
    manager.save(
      step,
      args=ocp.args.Composite(params=ocp.args.StandardSave(dict(params)), model=ocp.args.JsonSave(dict(description))),
      force=True,
    )
    manager.wait_until_finished()
  return directory / CHECKPOINT_SUBDIR / str(step)


def restore_params(step_dir: Path, target, stored: Callable[[], Any]) -> Any:
  """The params item of `step_dir`, laid out like `target` (ShapeDtypeStructs with shardings).

  A trainer checkpoint carries checksums: the parameters restored in their stored dtype (`stored()`, the
  abstract params as saved; only computed when there are checksums) are checked against them, raising DamagedCheckpointError on a mismatch; a
  cast, e.g. to serve in bfloat16, changes the bits and is not compared.
  """
  # The params item alone, read with a plain Checkpointer: a read-only CheckpointManager would log warnings
  # ("Given directory is read only") on every load that tell a user nothing.
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(step_dir / "params", target)
  record_file = step_dir / integrity.INTEGRITY_ITEM / "metadata"
  if record_file.is_file():
    _verify_params(step_dir, params, stored(), json.loads(record_file.read_text()))
  return params


def _verify_params(step_dir: Path, params, stored, record) -> None:
  digests, _ = integrity.array_digests({"params": params})
  uncast = {
    jax.tree_util.keystr(path): leaf.dtype == ref.dtype
    for (path, leaf), ref in zip(
      jax.tree_util.tree_flatten_with_path({"params": params})[0], jax.tree.leaves({"params": stored})
    )
  }
  saved = (record or {}).get("arrays", {})
  bad = [k for k, ok in uncast.items() if ok and saved.get(k) != digests[k]]
  if bad:
    raise DamagedCheckpointError(step_dir, f"checksum mismatch in {len(bad)} parameter(s), e.g. {bad[:3]}")
