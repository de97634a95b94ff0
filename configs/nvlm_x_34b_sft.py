"""NVLM-X 34B, stage 2, supervised fine-tuning (docs/paper.md (g), Table 11): ViT frozen, LLM + alignment modules train.

    python train.py --config=configs/nvlm_x_34b_sft.py --config.workdir=/ckpt/nvlm_x_34b_sft \\
        --config.checkpoint.init_from=/ckpt/nvlm_x_34b_pretrain
    python -m nvlm_jax.training.plan --config=configs/nvlm_x_34b_sft.py --mesh=fsdp=64,tensor=8
    python train.py --config=configs/nvlm_x_34b_sft.py:runlocal       # the same stage, tiny model, CPU, ~1 minute

Backbones: InternViT-6B-448px-V1-5 (frozen in every stage) + Nous-Hermes-2-Yi-34B. Values from the paper's
Table 11 (docs/paper.md (g)); the mesh assumes 512 accelerators (64-way fsdp x 8-way tensor, the paper's TP 8).

Table 11: global batch 512 (34B) / 256 (72B), min LR 1e-6 (34B) / 1e-7 (72B); this is 34B.
Text-only SFT data is blended in (paper 4.3).

init_from: the pretraining stage's workdir (or an imported NVLM checkpoint)
Data: the paper's SFT blend (configs/sft_blend.py: Table 6 plus the text-only SFT sets); set each
source's path, e.g. --config.data.sources.ShareGPT.path=/data/sharegpt.jsonl (weights: docs/data.md).

The values are those of configs/nvlm_x_72b_sft.py (the paper's tables give one column per variant);
this file moves them to the 34B backbone and sets the cells Table 11 gives per size.
"""

from nvlm_jax.training.config_base import on_yi_34b, runlocal, sibling_config


def get_config(arg=None):
  c = on_yi_34b(sibling_config(__file__, "nvlm_x_72b_sft"))
  # Table 11, NVLM-X: 34B trains with batch 512 and min LR 1e-6 (72B: 256 and 1e-7).
  c.optimizer.min_lr = 1e-6
  c.data.global_batch_size = 512
  c.data.num_microbatches = 4  # 512 rows / 64 batch shards = 8 per device -> 2 per microbatch
  if arg == "runlocal":
    c = runlocal(c, "tiny_nvlm_x")
  return c
