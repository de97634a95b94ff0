"""Training: the batch contract, freezing + AdamW, the jitted sharded step, checkpoints, metrics, planner.

    from nvlm_jax.training import train
    train(config)                                   # what train.py runs (see docs/training.md)
    model, params = nvlm_jax.models.load_checkpoint(workdir)  # a trained model, for model.apply / generate

Names are imported lazily: `import nvlm_jax.training` does not pull in orbax or grain.
"""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

_LAZY = {
  "train": "nvlm_jax.training.trainer",
  "Trainer": "nvlm_jax.training.trainer",
  "NonFiniteLossError": "nvlm_jax.training.trainer",
  "check_batch": "nvlm_jax.training.batch",
  "base_config": "nvlm_jax.training.config_base",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
