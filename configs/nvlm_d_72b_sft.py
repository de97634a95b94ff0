"""NVLM-D 72B, stage 2, supervised fine-tuning (docs/paper.md (g), Table 11): ViT frozen, LLM + alignment modules train.

    python train.py --config=configs/nvlm_d_72b_sft.py --config.workdir=/ckpt/nvlm_d_72b_sft \\
        --config.checkpoint.init_from=/ckpt/nvlm_d_72b_pretrain
    python -m nvlm_jax.training.plan --config=configs/nvlm_d_72b_sft.py --mesh=fsdp=64,tensor=8
    python train.py --config=configs/nvlm_d_72b_sft.py:runlocal       # the same stage, tiny model, CPU, ~1 minute

Backbones: InternViT-6B-448px-V1-5 (frozen in every stage) + Qwen2-72B-Instruct. Values from the paper's
Table 11 (docs/paper.md (g)); the mesh assumes 512 accelerators (64-way fsdp x 8-way tensor, the paper's TP 8).

Megatron's released 72B SFT script deviates from Table 11: global batch 256 and betas
(0.9, 0.95); the 34B script uses batch 128. We follow the paper's table.
The authors trained with TP 8 x PP 4; we shard with fsdp x tensor (no pipeline stages).

init_from: the pretraining stage's workdir (or an imported NVLM checkpoint)
Data: the paper's SFT blend (configs/sft_blend.py: Table 6 plus the text-only SFT sets); set each
source's path, e.g. --config.data.sources.ShareGPT.path=/data/sharegpt.jsonl (weights: docs/data.md).
"""

from nvlm_jax.training.config_base import PEAK_TFLOPS, base_config, runlocal, sibling_config


def get_config(arg=None):
  c = base_config()
  c.workdir = "/tmp/nvlm_d_72b_sft"
  c.total_steps = 40_000
  c.trainable = ("projector", "language_model")  # MLP projector + LLM

  c.model.preset = "nvlm_d_72b"
  c.model.dtype = "bfloat16"  # compute
  c.model.param_dtype = "float32"  # fp32 master weights for what trains
  # Frozen towers: bf16, no fp32 master copy.
  c.model.overrides = {"vision": {"param_dtype": "bfloat16"}}
  c.model.remat = {"vision": "", "llm": "full"}  # the ViT runs forward only

  # AdamW, linear warmup then cosine to min_lr (Table 11).
  c.optimizer.lr = 2e-6
  c.optimizer.min_lr = 2.5e-7
  c.optimizer.warmup_steps = 1000
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 10.0

  c.data.kind = "nvlm_pipeline"
  c.data.tokenizer = ""  # "": the tokenizer of checkpoint.init_from
  c.data.sources = sibling_config(__file__, "sft_blend").sources  # Table 6 + text-only SFT: fill in the paths
  c.data.global_batch_size = 128
  c.data.seq_len = 3200
  c.data.max_tiles = 7  # 6 tiles + thumbnail, 1-D tile tags
  c.data.processor = {"use_tiling": True, "max_tiles_per_image": 6, "use_thumbnail": True, "tile_tag_format": "1d"}
  c.data.num_microbatches = 2  # 128 rows / 64 batch shards = 2 per device -> 1 per microbatch
  c.data.worker_count = 8

  c.mesh.update(data=1, fsdp=-1, tensor=8)
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.init_from = "/ckpt/nvlm_d_72b_pretrain"
  c.log.every_steps = 10
  c.log.peak_tflops_per_device = PEAK_TFLOPS["h100"]

  if arg == "runlocal":
    c = runlocal(c, "tiny_nvlm_d")
  return c
