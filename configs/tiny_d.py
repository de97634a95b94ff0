"""The tiny NVLM-D demo: train on the built-in synthetic image QA set on a laptop CPU (the default config).

    python train.py                                     # = --config=configs/tiny_d.py
    python train.py --config.total_steps=50             # a quicker look

Model: the `tiny_nvlm_d` preset (2-layer 56 px InternViT, pixel shuffle to 16 tokens per tile, 2-layer
projector, 2-layer Qwen2-style decoder) with the 512-token vocabulary of the tiny demo tokenizer (trained
offline on the synthetic corpus; its placeholder id reaches the model config from the processor).
Recipe: NVLM's SFT stage at toy scale: ViT frozen, projector + LLM trained, AdamW with warmup + cosine;
6 + 1 DHR tiles, 1-D tile tags. Leaves a checkpoint in the workdir that
`nvlm_jax.models.load_checkpoint` (and `nvlm_jax.load_pretrained`) can load, and the tokenizer +
processor settings next to it (`nvlm_jax.load_processor`).
"""

from nvlm_jax.training.config_base import base_config


def get_config(arg=None):
  c = base_config()
  c.workdir = "/tmp/nvlm_tiny_d"
  c.total_steps = 300
  c.trainable = ("projector", "language_model")  # SFT: ViT frozen (docs/paper.md (g), Table 11)

  c.model.preset = "tiny_nvlm_d"
  c.model.dtype = "float32"  # bf16 buys nothing on CPU
  c.model.param_dtype = "float32"
  c.model.overrides = {"llm": {"vocab_size": 512}}  # the tiny demo tokenizer (token ids: from the processor)

  c.optimizer.lr = 2e-3
  c.optimizer.min_lr = 2e-4
  c.optimizer.warmup_steps = 20
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip = 1.0

  c.data.kind = "nvlm_pipeline"
  c.data.tokenizer = "tiny_synthetic"
  c.data.sources = [
    {"kind": "synthetic", "weight": 1.0, "num_samples": 100_000, "seed": 0, "size": "tiny", "text_only_fraction": 0.2}
  ]
  c.data.global_batch_size = 8
  c.data.seq_len = 256
  c.data.max_tiles = 7  # 6 tiles + thumbnail
  c.data.pack = "all"
  c.data.read_threads = 2
  c.data.batch_prefetch = 2

  c.checkpoint.every_steps = 100
  c.checkpoint.max_to_keep = 2
  c.log.every_steps = 10
  return c
