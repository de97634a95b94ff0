"""The tiny NVLM-H demo: train on the built-in synthetic image QA set on a laptop CPU.

    python train.py --config=configs/tiny_h.py
    python train.py --config=configs/tiny_h.py --config.total_steps=50     # a quicker look

Model: the `tiny_nvlm_h` preset (tiny InternViT, projector and gated
cross-attention layers in a tiny Qwen2-style decoder) with the vocabulary of the tiny demo tokenizer
(trained offline on the synthetic corpus: 512 tokens). Recipe: NVLM's SFT stage at toy scale: ViT frozen;
projector, cross-attention layers and LLM trained; AdamW with warmup + cosine; 6 + 1 DHR tiles, 1-D tile tags.
Leaves a checkpoint in the workdir that `nvlm_jax.models.load_checkpoint` can load, and the
tokenizer + processor settings next to it.
"""

from nvlm_jax.training.config_base import sibling_config


def get_config(arg=None):
  c = sibling_config(__file__, "tiny_x", arg)  # the same demo, hybrid fusion
  c.workdir = "/tmp/nvlm_tiny_h"
  c.model.preset = "tiny_nvlm_h"
  return c
