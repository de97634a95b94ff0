"""Text-only LM mode: a tiny Qwen2-style CausalLM on synthetic token sequences (no tokenizer, no files).

    python train.py --config=configs/tiny_lm.py --config.workdir=/tmp/tiny_lm

Trains in about a minute on 2 CPU cores; the loss falls from ~log(256) = 5.5 towards 0. The tests use it
with fewer steps. `arg` (after a colon, e.g. configs/tiny_lm.py:fast) selects a smaller variant.
"""

from nvlm_jax.training.config_base import base_config


def get_config(arg=None):
  c = base_config()
  c.workdir = "/tmp/nvlm_tiny_lm"
  c.total_steps = 200
  c.trainable = ("*",)

  c.model.decoder = dict(
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    rope_theta=10_000.0,
    qkv_bias=True,
    max_position_embeddings=1024,
  )
  c.model.dtype = "float32"  # exact comparisons in tests; use bfloat16 for speed on accelerators
  c.model.param_dtype = "float32"

  c.optimizer.lr = 3e-3
  c.optimizer.min_lr = 3e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 1.0

  c.data.kind = "synthetic_lm"
  c.data.global_batch_size = 8
  c.data.seq_len = 64
  c.data.num_microbatches = 1

  c.checkpoint.every_steps = 50
  c.log.every_steps = 10
  if arg == "fast":
    c.total_steps = 20
    c.checkpoint.every_steps = 10
    c.log.every_steps = 1
  return c
