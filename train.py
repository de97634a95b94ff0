"""Train an NVLM (or a text-only LM) from an ml_collections config.

    python train.py                                   # configs/tiny_d.py: the tiny NVLM-D demo on CPU
    python train.py --config=configs/nvlm_d_72b_sft.py --config.workdir=gs://... --config.mesh.fsdp=64
    python train.py --config=configs/tiny_lm.py --config.total_steps=50

Rerunning the same command resumes from the latest checkpoint in the workdir. Multi-host: pass
--config.distributed.coordinator_address=HOST:PORT with num_processes / process_id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or "auto" on a managed cluster.
See docs/training.md.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny_d.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides config.workdir.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from nvlm_jax.training.config_base import missing_config_file

  if problem := missing_config_file(flags.FLAGS["config"]):
    raise app.UsageError(problem)
  config = _CONFIG.value
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep orbax's INFO chatter out of the progress lines (-v 0: show it)
  # Must run before anything initializes the JAX backend.
  from nvlm_jax.training.distributed import initialize_from_config

  initialize_from_config(config.distributed)

  import jax
  from nvlm_jax.training.run_identity import RunIdentityError, recipe_name
  from nvlm_jax.training.trainer import train

  with config.unlocked():
    config.recipe = config.get("recipe") or recipe_name(config_flags.get_config_filename(flags.FLAGS["config"]))
  if jax.process_index() == 0:
    print(f"recipe {config.recipe}, workdir {os.path.abspath(_WORKDIR.value or config.workdir)}", flush=True)
  try:
    train(config, workdir=_WORKDIR.value)
  except RunIdentityError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
