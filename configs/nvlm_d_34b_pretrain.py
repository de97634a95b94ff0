"""NVLM-D 34B, stage 1, pretraining (docs/paper.md (g), Table 10): only the modality-alignment modules train.

    python train.py --config=configs/nvlm_d_34b_pretrain.py --config.workdir=/ckpt/nvlm_d_34b_pretrain \\
        --config.checkpoint.init_from=/ckpt/nvlm_d_34b_init
    python -m nvlm_jax.training.plan --config=configs/nvlm_d_34b_pretrain.py --mesh=fsdp=64,tensor=8
    python train.py --config=configs/nvlm_d_34b_pretrain.py:runlocal       # the same stage, tiny model, CPU, ~1 minute

Backbones: InternViT-6B-448px-V1-5 (frozen in every stage) + Nous-Hermes-2-Yi-34B. Values from the paper's
Table 10 (docs/paper.md (g)); the mesh assumes 512 accelerators (64-way fsdp x 8-way tensor, the paper's TP 8).

Megatron's released script (pretrain_qwen20_72b_internvit_6b.sh) counts warmup/decay in samples
(83,200 / 25,600,000) and trains 122,880,000 samples; we follow Table 10 in steps.
Its dropout 0.1 on the frozen LLM is not modelled (our decoder has no dropout).

init_from: InternViT-6B + Nous-Hermes-2-Yi-34B + a freshly initialized projector in one checkpoint
(`python -m nvlm_jax.convert stitch --variant d`)
Data: fill `data.sources` with the pretraining blend of Table 4 (captioning, VQA, OCR, ...)
(blend weights are the user's choice; see docs/data.md).

The values are those of configs/nvlm_d_72b_pretrain.py (the paper's tables give one column per variant);
this file moves them to the 34B backbone.
"""

from nvlm_jax.training.config_base import on_yi_34b, runlocal, sibling_config


def get_config(arg=None):
  c = on_yi_34b(sibling_config(__file__, "nvlm_d_72b_pretrain"))
  if arg == "runlocal":
    c = runlocal(c, "tiny_nvlm_d")
  return c
