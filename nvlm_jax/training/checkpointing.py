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
        integrity/               checksums of every array and of the data states (checkpoint_integrity.py)
      damaged_checkpoints/<step>/  steps found damaged at a resume, moved here for inspection
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

from nvlm_jax import models
from nvlm_jax import sharding as sharding_lib
from nvlm_jax.training import checkpoint_integrity as integrity

CHECKPOINT_SUBDIR = "checkpoints"
MODEL_DESCRIPTION_FILE = "nvlm_model.json"
STATE_ITEMS = ("params", "opt_state", "train_meta")
TRAIN_ONLY_ITEMS = ("opt_state", "train_meta", integrity.INTEGRITY_ITEM, "data")
DAMAGED_SUBDIR = "damaged_checkpoints"
META_FIELDS = ("step", "applied_steps", "skipped_steps", "nonfinite_streak", "rng")


def _has_data_state(iterator) -> bool:
  return iterator is not None and hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


class DamagedCheckpointError(RuntimeError):
  """One checkpoint step cannot be used whole: an item is missing or unreadable, or a checksum differs."""

  def __init__(self, path: Path, reason: str):
    self.path, self.reason = path, reason
    super().__init__(f"checkpoint {path} is damaged: {reason}")


class NoIntactCheckpointError(RuntimeError):
  """The workdir has checkpoints but none of them is intact."""


def _short(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _state_tree(state) -> dict:
  """The arrays a checkpoint holds, keyed like its items (the names in the integrity record)."""
  return {
    "params": state.params,
    "opt_state": state.opt_state,
    "train_meta": {k: getattr(state, k) for k in META_FIELDS},
  }


def _processes_where(flag: bool) -> list[int]:
  """The indices of the processes whose `flag` is True (a collective when there are several)."""
  if jax.process_count() == 1:
    return [0] if flag else []
  import numpy as np
  from jax.experimental import multihost_utils

  flags = np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).reshape(-1)
  return [i for i, f in enumerate(flags) if f]


class TrainCheckpointer:
  """CheckpointManager for the train state and the data iterator: async saves, keeps the last N, and
  restores only a checkpoint whose every item is present, readable and matches its checksums."""

  def __init__(
    self, workdir: str | os.PathLike, *, max_to_keep: int = 3, save_interval_steps: int = 1000, async_save: bool = True
  ):
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / CHECKPOINT_SUBDIR
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def is_params_only(self, step: int) -> bool:
    """True for a step with parameters but no train state, e.g. written by checkpoint.from_parts.save_checkpoint
    (an init). A trainer step that lost some of its items is not params-only: it is damaged."""
    step_dir = self.directory / str(step)
    if any((step_dir / item).exists() for item in TRAIN_ONLY_ITEMS):
      return False
    try:
      handlers = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text()).get("item_handlers") or {}
    except (OSError, ValueError, AttributeError):
      handlers = {}
    return not any(item in handlers for item in TRAIN_ONLY_ITEMS)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def due(self, step: int, force: bool = False) -> bool:
    """Whether a checkpoint is to be written after `step` (every `save_interval_steps`, or `force`)."""
    return force or self.manager.should_save(step)

  def save(self, step: int, state, data_iterator=None, model_description: dict | None = None) -> bool:
    """Writes the checkpoint of `step` (call it when `due`), with its integrity record. All processes
    must call it. Returns False, writing nothing, if a parameter is not finite."""
    digests, finite = integrity.array_digests(_state_tree(state), state.params)
    if not finite:
      return False
    items = {
      "params": ocp.args.StandardSave(state.params),
      "opt_state": ocp.args.StandardSave(state.opt_state),
      "train_meta": ocp.args.StandardSave({k: getattr(state, k) for k in META_FIELDS}),
    }
    if model_description is not None:
      items["model"] = ocp.args.JsonSave(model_description)
    data_digests = None
    if _has_data_state(data_iterator):
      import grain

      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
      data_digests = integrity.gather_data_digests(data_iterator)
    record = integrity.record(step, digests, data_digests, list(items) + [integrity.INTEGRITY_ITEM])
    items[integrity.INTEGRITY_ITEM] = ocp.args.JsonSave(record)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The TrainState saved at `step`, laid out like `abstract_state` (ShapeDtypeStructs with shardings).

    Raises DamagedCheckpointError unless every item is present and readable and every array (and the
    data iterator state) matches the checksums written with it. The data iterator, if given, is moved
    to the saved position in place (only once the train state has verified).
    """
    step_dir = self.directory / str(step)
    required = list(STATE_ITEMS) + [integrity.INTEGRITY_ITEM] + (["data"] if _has_data_state(data_iterator) else [])
    missing = [item for item in required if not (step_dir / item).is_dir()]
    if missing:
      raise DamagedCheckpointError(step_dir, f"item(s) {missing} missing")
    items = {
      "params": ocp.args.StandardRestore(abstract_state.params),
      "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
      "train_meta": ocp.args.StandardRestore({k: getattr(abstract_state, k) for k in META_FIELDS}),
      integrity.INTEGRITY_ITEM: ocp.args.JsonRestore(),
    }
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore, JSON, orbax metadata errors: all mean "cannot use this step"
      raise DamagedCheckpointError(step_dir, f"an item is unreadable ({_short(e)})") from e
    record = restored[integrity.INTEGRITY_ITEM]
    if not isinstance(record, dict) or record.get("format") != integrity.FORMAT or "arrays" not in record:
      raise DamagedCheckpointError(step_dir, f"item '{integrity.INTEGRITY_ITEM}' is not an integrity record")
    missing = [item for item in record.get("items", []) if not (step_dir / item).is_dir()]
    if missing:  # e.g. the model description: not needed to resume, but the checkpoint is not whole
      raise DamagedCheckpointError(step_dir, f"item(s) {missing} missing")
    state = abstract_state.replace(params=restored["params"], opt_state=restored["opt_state"], **restored["train_meta"])
    digests, _ = integrity.array_digests(_state_tree(state))
    bad = integrity.mismatched_arrays(record["arrays"], digests)
    if bad:
      raise DamagedCheckpointError(step_dir, f"checksum mismatch in {len(bad)} array(s), e.g. {bad[:3]}")
    if int(jax.device_get(state.step)) != step:
      raise DamagedCheckpointError(step_dir, f"train_meta holds step {int(jax.device_get(state.step))}")
    if _has_data_state(data_iterator):
      problem = self._restore_data(step, data_iterator, record)
      failed = _processes_where(problem is not None)
      if failed:  # every process must give up on the step together, or the next restore would hang
        raise DamagedCheckpointError(step_dir, problem or f"item 'data' of process(es) {failed} is damaged")
    return state

  def _restore_data(self, step: int, data_iterator, record: dict) -> str | None:
    """Moves the iterator to the saved position; what is wrong with this process's data state, or None."""
    import grain

    try:
      self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:
      return f"item 'data' is unreadable ({_short(e)})"
    saved = (record.get("data") or [None] * jax.process_count())[jax.process_index()]
    if saved != integrity.data_state_digest(data_iterator.get_state()):
      return f"checksum mismatch in item 'data' (process {jax.process_index()})"
    return None

  def restore_newest_intact(self, abstract_state, data_iterator=None):
    """(state, step, [(path, reason) of each newer step that is damaged]) for the newest intact step.

    Raises NoIntactCheckpointError, listing every step and why it is unusable, if there is none.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      if self.is_params_only(step):
        damaged.append((self.directory / str(step), "params only (no optimizer state, counters or data position)"))
        continue
      try:
        return self.restore(step, abstract_state, data_iterator), step, damaged
      except DamagedCheckpointError as e:
        damaged.append((e.path, e.reason))
    listing = "\n".join(f"  {path}: {reason}" for path, reason in damaged)
    raise NoIntactCheckpointError(
      f"{self.directory} holds checkpoints, but none is intact:\n{listing}\nNothing was changed. Move the "
      "damaged steps away to start over from scratch, or restore them from a copy."
    )

  def set_aside(self, step_dirs: list[Path]) -> list[Path]:
    """Moves damaged step directories to WORKDIR/damaged_checkpoints/ (kept for inspection; orbax would
    otherwise refuse every save up to their step). Returns the new paths. All processes must call it."""
    self.manager.close()
    moved = []
    for step_dir in step_dirs:
      target = self.workdir / DAMAGED_SUBDIR / step_dir.name
      n = 1
      while target.exists():
        target, n = self.workdir / DAMAGED_SUBDIR / f"{step_dir.name}.{n}", n + 1
      if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        step_dir.rename(target)
      moved.append(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("nvlm_jax_set_aside_damaged_checkpoints")
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)
    return moved

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
  steps = (
    sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "params").is_dir()) if path.is_dir() else []
  )
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
  raise FileNotFoundError(f"{directory / str(step)}: no model description (item 'model' or {workdir_file})")


def load_checkpoint(
  path: str | os.PathLike,
  *,
  step: int | None = None,
  mesh=None,
  dtype: str | None = None,
  param_dtype: str | None = None,
  rules=sharding_lib.LOGICAL_AXIS_RULES,
):
  """(model, params) from a trainer checkpoint (latest step unless `step`).

  dtype / param_dtype override the saved compute / storage dtypes (e.g. "bfloat16" to serve); with a
  `mesh`, every parameter is restored directly onto its NamedSharding, otherwise onto one device.
  """
  directory, step = _resolve(path, step)
  model_config = saved_config = models.config_from_description(read_model_description(directory, step))
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
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed), shardings
  )
  # The params item alone, read with a plain Checkpointer: a read-only CheckpointManager would log warnings
  # ("Given directory is read only") on every load that tell a user nothing.
  step_dir = directory / str(step)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(step_dir / "params", target)
  record_file = step_dir / integrity.INTEGRITY_ITEM / "metadata"  # trainer checkpoints have checksums
  if record_file.is_file():
    stored = nn.meta.unbox(models.abstract_variables(models.module_for_config(saved_config), saved_config)["params"])
    _verify_params(step_dir, params, stored, json.loads(record_file.read_text()))
  return model, params


def _verify_params(step_dir: Path, params, stored, record) -> None:
  """Checks the parameters restored for inference against the checksums saved with them (those restored
  in their stored dtype; a cast, e.g. to serve in bfloat16, changes the bits)."""
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
