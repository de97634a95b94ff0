"""Our own checkpoint directory: train state + data iterator + a JSON model description, via orbax.

Layout of a training workdir::

    WORKDIR/
      nvlm_model.json            the model description (models.describe_model), for humans and tools
      checkpoints/<step>/        one orbax CheckpointManager step, items:
        params/                  the model parameters (orbax StandardSave, sharded, fp32 master weights)
        opt_state/               AdamW moments of the trainable parameters only
        train_meta/              step counters and the PRNG key data (TrainState minus params/opt_state)
        model/                   the same model description as JSON (a step directory is self-contained)
        data/                    the grain iterator state, one file per process (absent without an iterator)
      metrics.jsonl, tensorboard/ ...

`load_checkpoint(path)` accepts WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/<step> and returns
(model, params) ready for `model.apply({"params": params}, ...)`; `nvlm_jax.load_pretrained` detects such a
directory with `is_training_checkpoint`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from nvlm_jax import sharding as sharding_lib
from nvlm_jax.training import models

CHECKPOINT_SUBDIR = "checkpoints"
MODEL_DESCRIPTION_FILE = "nvlm_model.json"
STATE_ITEMS = ("params", "opt_state", "train_meta")
META_FIELDS = ("step", "applied_steps", "skipped_steps", "nonfinite_streak", "rng")


def _has_data_state(iterator) -> bool:
  return iterator is not None and hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


class TrainCheckpointer:
  """CheckpointManager for the train state and the data iterator: async saves, keeps the last N."""

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, save_interval_steps: int = 1000,
               async_save: bool = True):
    self.directory = Path(workdir).absolute() / CHECKPOINT_SUBDIR
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def has_train_state(self, step: int) -> bool:
    """False for a params-only step (e.g. written by nvlm_jax.fusion.build.save_checkpoint): an init."""
    return all((self.directory / str(step) / item).is_dir() for item in STATE_ITEMS)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, model_description: dict | None = None,
           force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started. All processes must call it."""
    items = {
        "params": ocp.args.StandardSave(state.params),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "train_meta": ocp.args.StandardSave({k: getattr(state, k) for k in META_FIELDS}),
    }
    if model_description is not None:
      items["model"] = ocp.args.JsonSave(model_description)
    if _has_data_state(data_iterator):
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The TrainState saved at `step`, laid out like `abstract_state` (ShapeDtypeStructs with shardings).

    The data iterator, if given and saved, is moved to the saved position in place.
    """
    items = {
        "params": ocp.args.StandardRestore(abstract_state.params),
        "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
        "train_meta": ocp.args.StandardRestore({k: getattr(abstract_state, k) for k in META_FIELDS}),
    }
    step_dir = self.directory / str(step)
    if _has_data_state(data_iterator):
      if not (step_dir / "data").exists():
        raise FileNotFoundError(f"checkpoint {step_dir} has no data iterator state; cannot resume the "
                                "data stream exactly (delete the workdir to start over)")
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return abstract_state.replace(params=restored["params"], opt_state=restored["opt_state"],
                                  **restored["train_meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def write_model_description(workdir: str | os.PathLike, description: dict) -> None:
  if jax.process_index() == 0:
    path = Path(workdir) / MODEL_DESCRIPTION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(description, indent=2, sort_keys=True))
    tmp.replace(path)


# --- loading for inference / evaluation ------------------------------------------------------------

def _resolve(path: str | os.PathLike, step: int | None) -> tuple[Path, int]:
  """(checkpoint manager directory, step) for a workdir, its checkpoints/ dir, or one step dir."""
  path = Path(path).absolute()
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  elif path.name.isdigit() and (path / "params").is_dir():
    if step is not None and step != int(path.name):
      raise ValueError(f"{path} is the checkpoint of step {path.name}, but step={step} was asked for")
    return path.parent, int(path.name)
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "params").is_dir()) \
      if path.is_dir() else []
  if not steps:
    raise FileNotFoundError(f"{path}: no nvlm_jax training checkpoint (expected {CHECKPOINT_SUBDIR}/<step>/params)")
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"{path}: no checkpoint for step {step}; available steps {steps}")
  return path, step


def is_training_checkpoint(path: str | os.PathLike) -> bool:
  """True if `path` is a workdir, checkpoints dir or step dir written by the trainer."""
  try:
    _resolve(path, None)
    return True
  except (FileNotFoundError, NotADirectoryError):
    return False


def read_model_description(path: str | os.PathLike, step: int | None = None) -> dict:
  directory, step = _resolve(path, step)
  model_item = directory / str(step) / "model"
  if model_item.is_dir():
    files = [f for f in model_item.iterdir() if f.suffix == ".json" or f.name == "metadata"]
    for f in files:
      try:
        data = json.loads(f.read_text())
      except (json.JSONDecodeError, UnicodeDecodeError):
        continue
      if isinstance(data, dict) and data.get("format") == models.DESCRIPTION_FORMAT:
        return data
  workdir_file = directory.parent / MODEL_DESCRIPTION_FILE
  if workdir_file.exists():
    return json.loads(workdir_file.read_text())
  raise FileNotFoundError(f"{directory / str(step)}: no model description (item 'model' or "
                          f"{workdir_file})")


def load_checkpoint(path: str | os.PathLike, *, step: int | None = None, mesh=None, dtype: str | None = None,
                    param_dtype: str | None = None, rules=sharding_lib.LOGICAL_AXIS_RULES):
  """(model, params) from a trainer checkpoint (latest step unless `step`).

  dtype / param_dtype override the saved compute / storage dtypes (e.g. "bfloat16" to serve); with a
  `mesh`, every parameter is restored directly onto its NamedSharding, otherwise onto one device.
  """
  directory, step = _resolve(path, step)
  model_config = models.config_from_description(read_model_description(directory, step))
  if dtype:
    model_config = models._set_everywhere(model_config, "dtype", dtype)
  if param_dtype:
    model_config = models._set_everywhere(model_config, "param_dtype", param_dtype)
  model = models.module_for_config(model_config)
  boxed = models.abstract_variables(model, model_config)["params"]
  if mesh is not None:
    shardings = sharding_lib.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.meta.unbox(boxed))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                        shardings)
  # The params item alone, read with a plain Checkpointer: a read-only CheckpointManager would log warnings
  # ("Given directory is read only") on every load that tell a user nothing.
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(directory / str(step) / "params", target)
  return model, params
