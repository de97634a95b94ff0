"""NVLM-X 72B, stage 2, supervised fine-tuning (docs/paper.md (g), Table 11): ViT frozen, LLM + alignment modules train.

    python train.py --config=configs/nvlm_x_72b_sft.py --config.workdir=/ckpt/nvlm_x_72b_sft \\
        --config.checkpoint.init_from=/ckpt/nvlm_x_72b_pretrain
    python -m nvlm_jax.training.plan --config=configs/nvlm_x_72b_sft.py --mesh=fsdp=64,tensor=8
    python train.py --config=configs/nvlm_x_72b_sft.py:runlocal       # the same stage, tiny model, CPU, ~1 minute

Backbones: InternViT-6B-448px-V1-5 (frozen in every stage) + Qwen2-72B-Instruct. Values from the paper's
Table 11 (docs/paper.md (g)); the mesh assumes 512 accelerators (64-way fsdp x 8-way tensor, the paper's TP 8).

Table 11: global batch 512 (34B) / 256 (72B), min LR 1e-6 (34B) / 1e-7 (72B); this is 72B.
Text-only SFT data is blended in (paper 4.3).

init_from: the pretraining stage's workdir (or an imported NVLM checkpoint)
Data: the paper's SFT blend (configs/sft_blend.py: Table 6 plus the text-only SFT sets); set each
source's path, e.g. --config.data.sources.ShareGPT.path=/data/sharegpt.jsonl (weights: docs/data.md).
"""

from nvlm_jax.training.config_base import PEAK_TFLOPS, base_config, runlocal, sibling_config


def get_config(arg=None):
  c = base_config()
  c.workdir = "/tmp/nvlm_x_72b_sft"
  c.total_steps = 20_000
  c.trainable = ("projector", "*cross_attn*", "language_model")  # projector + X-attn layers + LLM (Table 9)

  c.model.preset = "nvlm_x_72b"
  c.model.dtype = "bfloat16"  # compute
  c.model.param_dtype = "float32"  # fp32 master weights for what trains
  # Frozen towers: bf16, no fp32 master copy.
  c.model.overrides = {"vision": {"param_dtype": "bfloat16"}}
  c.model.remat = {"vision": "", "llm": "full"}  # the ViT runs forward only

  # AdamW, linear warmup then cosine to min_lr (Table 11).
  c.optimizer.lr = 1e-5
  c.optimizer.min_lr = 1e-7
  c.optimizer.warmup_steps = 500
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip = 1.0

  c.data.kind = "nvlm_pipeline"
  c.data.tokenizer = ""  # "": the tokenizer of checkpoint.init_from
  c.data.sources = sibling_config(__file__, "sft_blend").sources  # Table 6 + text-only SFT: fill in the paths
  c.data.global_batch_size = 256
  c.data.seq_len = 1024
  c.data.max_tiles = 7  # 6 tiles + thumbnail, 1-D tile tags
  c.data.processor = {"use_tiling": True, "max_tiles_per_image": 6, "use_thumbnail": True, "tile_tag_format": "1d"}
  c.data.num_microbatches = 2  # 256 rows / 64 batch shards = 4 per device -> 2 per microbatch
  c.data.worker_count = 8

  c.mesh.update(data=1, fsdp=-1, tensor=8)
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.init_from = "/ckpt/nvlm_x_72b_pretrain"
  c.log.every_steps = 10
  c.log.peak_tflops_per_device = PEAK_TFLOPS["h100"]

  if arg == "runlocal":
    c = runlocal(c, "tiny_nvlm_x")
  return c
