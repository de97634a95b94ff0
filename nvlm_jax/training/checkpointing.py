"""The trainer's checkpoints: train state + data iterator + integrity record, saved and resumed via orbax.

A training step directory holds, besides `params/` and `model/` (the layout of
nvlm_jax/checkpoint/orbax_checkpoint.py, which `models.load_checkpoint` reads):

    opt_state/                 AdamW moments of the trainable parameters only
    train_meta/                step counters and the PRNG key data (TrainState minus params/opt_state)
    data/                      the grain iterator state, one file per process (absent without an iterator)
    integrity/                 checksums of every array and of the data states (checkpoint/integrity.py)

A resume restores the newest step whose every item is present, readable and matches its checksums; damaged
steps are moved to WORKDIR/damaged_checkpoints/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from nvlm_jax.checkpoint import integrity
from nvlm_jax.checkpoint.orbax_checkpoint import CHECKPOINT_SUBDIR, DamagedCheckpointError

STATE_ITEMS = ("params", "opt_state", "train_meta")
TRAIN_ONLY_ITEMS = ("opt_state", "train_meta", integrity.INTEGRITY_ITEM, "data")
DAMAGED_SUBDIR = "damaged_checkpoints"
META_FIELDS = ("step", "applied_steps", "skipped_steps", "nonfinite_streak", "rng")


def _has_data_state(iterator) -> bool:
  return iterator is not None and hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


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
    """True for a step with parameters but no train state, e.g. written by models.save_checkpoint
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
