"""NVLM-X 72B, stage 1, pretraining (docs/paper.md (g), Table 10): only the modality-alignment modules train.

    python train.py --config=configs/nvlm_x_72b_pretrain.py --config.workdir=/ckpt/nvlm_x_72b_pretrain \\
        --config.checkpoint.init_from=/ckpt/nvlm_x_72b_init
    python -m nvlm_jax.training.plan --config=configs/nvlm_x_72b_pretrain.py --mesh=fsdp=64,tensor=8
    python train.py --config=configs/nvlm_x_72b_pretrain.py:runlocal       # the same stage, tiny model, CPU, ~1 minute

Backbones: InternViT-6B-448px-V1-5 (frozen in every stage) + Qwen2-72B-Instruct. Values from the paper's
Table 10 (docs/paper.md (g)); the mesh assumes 512 accelerators (64-way fsdp x 8-way tensor, the paper's TP 8).

Trainable: the X-attention layers (Table 10) and the one-layer projector (12800 -> LLM width) that feeds
them, which starts from random init and is the other half of NVLM-X's modality-alignment module.
No tile tags: one 448 px tile per image, as the authors' pretraining.

init_from: InternViT-6B + Qwen2-72B-Instruct stitched by `python -m nvlm_jax.convert stitch`
(`--variant x`; new X-attention layers at init)
Data: fill `data.sources` with the pretraining blend of Table 4 (captioning, VQA, OCR, ...)
(blend weights are the user's choice; see docs/data.md).
"""

from nvlm_jax.training.config_base import PEAK_TFLOPS, base_config, runlocal


def get_config(arg=None):
  c = base_config()
  c.workdir = "/tmp/nvlm_x_72b_pretrain"
  c.total_steps = 20_000
  # The 10 gated X-attention layers (Table 10) and the one-layer projector feeding them: it is new, starts
  # from random init, and frozen it would stay a fixed random map (docs/fusion.md, departures).
  c.trainable = ("projector", "*cross_attn*")

  c.model.preset = "nvlm_x_72b"
  c.model.dtype = "bfloat16"  # compute
  c.model.param_dtype = "float32"  # fp32 master weights for what trains
  # Frozen towers: bf16, no fp32 master copy (the LLM stays fp32: the X-attention blocks take its dtype).
  c.model.overrides = {"vision": {"param_dtype": "bfloat16"}}
  c.model.remat = {"vision": "", "llm": "full"}  # the ViT runs forward only

  # AdamW, linear warmup then cosine to min_lr (Table 10).
  c.optimizer.lr = 1e-4
  c.optimizer.min_lr = 1e-5
  c.optimizer.warmup_steps = 1000
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip = 1.0

  c.data.kind = "nvlm_pipeline"
  c.data.tokenizer = "/ckpt/Qwen2-72B-Instruct"  # the LLM's (convert stitch also copies it beside init_from)
  c.data.sources = [{"kind": "array_record", "path": "/data/nvlm_pretrain", "split": "train", "weight": 1.0}]
  c.data.global_batch_size = 2048
  c.data.seq_len = 512
  c.data.max_tiles = 1  # one 448 px tile, no DHR
  # One tile per image and no tile tag, as the authors' pretraining (Megatron's pretraining script has no
  # --use-tile-tags; tags name DHR tiles, and there are none here).
  c.data.processor = {"use_tiling": False, "max_tiles_per_image": 6, "use_thumbnail": False, "tile_tag_format": "none"}
  c.data.num_microbatches = 8  # 2048 rows / 64 batch shards = 32 per device -> 4 per microbatch
  c.data.worker_count = 8

  c.mesh.update(data=1, fsdp=-1, tensor=8)
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.init_from = "/ckpt/nvlm_x_72b_init"
  c.log.every_steps = 10
  c.log.peak_tflops_per_device = PEAK_TFLOPS["h100"]

  if arg == "runlocal":
    c = runlocal(c, "tiny_nvlm_x")
  return c
