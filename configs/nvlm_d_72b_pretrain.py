"""NVLM-D 72B, stage 1, pretraining (docs/paper.md (g), Table 10): only the modality-alignment modules train.

    python train.py --config=configs/nvlm_d_72b_pretrain.py --config.workdir=/ckpt/nvlm_d_72b_pretrain \\
        --config.checkpoint.init_from=/ckpt/nvlm_d_72b_init
    python -m nvlm_jax.training.plan --config=configs/nvlm_d_72b_pretrain.py --mesh=fsdp=64,tensor=8
    python train.py --config=configs/nvlm_d_72b_pretrain.py:runlocal       # the same stage, tiny model, CPU, ~1 minute

Backbones: InternViT-6B-448px-V1-5 (frozen in every stage) + Qwen2-72B-Instruct. Values from the paper's
Table 10 (docs/paper.md (g)); the mesh assumes 512 accelerators (64-way fsdp x 8-way tensor, the paper's TP 8).

Megatron's released script (pretrain_qwen20_72b_internvit_6b.sh) counts warmup/decay in samples
(83,200 / 25,600,000) and trains 122,880,000 samples; we follow Table 10 in steps.
Its dropout 0.1 on the frozen LLM is not modelled (our decoder has no dropout).

init_from: InternViT-6B + Qwen2-72B-Instruct + a freshly initialized projector in one checkpoint
(`python -m nvlm_jax.convert stitch --variant d`)
Data: fill `data.sources` with the pretraining blend of Table 4 (captioning, VQA, OCR, ...)
(blend weights are the user's choice; see docs/data.md).
"""

from nvlm_jax.training.config_base import PEAK_TFLOPS, base_config, runlocal


def get_config(arg=None):
  c = base_config()
  c.workdir = "/tmp/nvlm_d_72b_pretrain"
  c.total_steps = 20_000
  c.trainable = ("projector",)  # the MLP projector

  c.model.preset = "nvlm_d_72b"
  c.model.dtype = "bfloat16"  # compute
  c.model.param_dtype = "float32"  # fp32 master weights for what trains
  # Frozen towers: bf16, no fp32 master copy.
  c.model.overrides = {"vision": {"param_dtype": "bfloat16"}, "llm": {"param_dtype": "bfloat16"}}
  c.model.remat = {"vision": "", "llm": "full"}  # the ViT runs forward only

  # AdamW, linear warmup then cosine to min_lr (Table 10).
  c.optimizer.lr = 1e-4
  c.optimizer.min_lr = 2.5e-5
  c.optimizer.warmup_steps = 500
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 10.0

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
  c.checkpoint.init_from = "/ckpt/nvlm_d_72b_init"
  c.log.every_steps = 10
  c.log.peak_tflops_per_device = PEAK_TFLOPS["h100"]

  if arg == "runlocal":
    c = runlocal(c, "tiny_nvlm_d")
  return c
