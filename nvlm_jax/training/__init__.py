"""Training: the batch contract, freezing + AdamW, the jitted sharded step, checkpoints, metrics, planner.

    from nvlm_jax.training import train, load_checkpoint
    train(config)                                   # what train.py runs (see docs/training.md)
    model, params = load_checkpoint(workdir)        # a trained model, ready for model.apply / generate

Names are imported lazily: `import nvlm_jax.training` does not pull in orbax or grain.
"""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

_LAZY = {
  "train": "nvlm_jax.training.trainer",
  "Trainer": "nvlm_jax.training.trainer",
  "NonFiniteLossError": "nvlm_jax.training.trainer",
  "load_checkpoint": "nvlm_jax.training.checkpointing",
  "is_training_checkpoint": "nvlm_jax.training.checkpointing",
  "read_run_processor": "nvlm_jax.training.processor_setup",
  "check_batch": "nvlm_jax.training.batch",
  "base_config": "nvlm_jax.training.config_base",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
