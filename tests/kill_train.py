"""train.py with a SIGKILL injected at one phase of one checkpoint save (used by test_training_resume.py).

    python tests/kill_train.py PHASE STEP [train.py flags ...]

PHASE, for the checkpoint of step STEP:
  before_save    the step is done and logged, the save has not started
  mid_items      the save is under way: the arrays are being written into the temporary step directory
  before_commit  every item is written, the temporary directory is not yet renamed to the step
  after_commit   the step directory is committed (the run had moved on to later steps meanwhile)
"""

import os
import runpy
import signal
import sys
from pathlib import Path

PHASES = ("before_save", "mid_items", "before_commit", "after_commit")


def die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def is_step_dir(path, step: int) -> bool:
  path = Path(str(path))
  return path.name == str(step) and path.parent.name == "checkpoints"


def install(phase: str, step: int) -> None:
  if phase == "before_save":
    from nvlm_jax.training import checkpointing

    original_save = checkpointing.TrainCheckpointer.save

    def save(self, at, *args, **kwargs):
      if at == step:
        die()
      return original_save(self, at, *args, **kwargs)

    checkpointing.TrainCheckpointer.save = save
  elif phase == "mid_items":
    from grain._src.python.checkpoint import handler  # writes the data item, while orbax writes the arrays

    original_item_save = handler.CheckpointHandler.save

    def item_save(self, directory, *args, **kwargs):
      if Path(str(directory)).parent.name.startswith(f"{step}.orbax-checkpoint-tmp"):
        die()
      return original_item_save(self, directory, *args, **kwargs)

    handler.CheckpointHandler.save = item_save
  else:
    from orbax.checkpoint._src.path import atomicity

    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
      ours = is_step_dir(self.get_final(), step)
      if ours and phase == "before_commit":
        die()
      await original_finalize(self, *args, **kwargs)
      if ours and phase == "after_commit":
        die()

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


if __name__ == "__main__":
  phase, step = sys.argv[1], int(sys.argv[2])
  if phase not in PHASES:
    raise SystemExit(f"unknown phase {phase!r}; one of {PHASES}")
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  install(phase, step)
  train_py = Path(__file__).resolve().parents[1] / "train.py"
  sys.argv = [str(train_py)] + sys.argv[3:]
  runpy.run_path(str(train_py), run_name="__main__")
