"""NVLM-D 34B, stage 2, supervised fine-tuning (docs/paper.md (g), Table 11): ViT frozen, LLM + alignment modules train.

    python train.py --config=configs/nvlm_d_34b_sft.py --config.workdir=/ckpt/nvlm_d_34b_sft \\
        --config.checkpoint.init_from=/ckpt/nvlm_d_34b_pretrain
    python -m nvlm_jax.training.plan --config=configs/nvlm_d_34b_sft.py --mesh=fsdp=64,tensor=8
    python train.py --config=configs/nvlm_d_34b_sft.py:runlocal       # the same stage, tiny model, CPU, ~1 minute

Backbones: InternViT-6B-448px-V1-5 (frozen in every stage) + Nous-Hermes-2-Yi-34B. Values from the paper's
Table 11 (docs/paper.md (g)); the mesh assumes 512 accelerators (64-way fsdp x 8-way tensor, the paper's TP 8).

Megatron's released 72B SFT script deviates from Table 11: global batch 256 and betas
(0.9, 0.95); the 34B script uses batch 128. We follow the paper's table.
The authors trained with TP 8 x PP 4; we shard with fsdp x tensor (no pipeline stages).

init_from: the pretraining stage's workdir (or an imported NVLM checkpoint)
Data: the paper's SFT blend (configs/sft_blend.py: Table 6 plus the text-only SFT sets); set each
source's path, e.g. --config.data.sources.ShareGPT.path=/data/sharegpt.jsonl (weights: docs/data.md).

The values are those of configs/nvlm_d_72b_sft.py (the paper's tables give one column per variant);
this file moves them to the 34B backbone.
"""

from nvlm_jax.training.config_base import on_yi_34b, runlocal, sibling_config


def get_config(arg=None):
  c = on_yi_34b(sibling_config(__file__, "nvlm_d_72b_sft"))
  if arg == "runlocal":
    c = runlocal(c, "tiny_nvlm_d")
  return c
