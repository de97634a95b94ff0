"""NVLM-H 34B, stage 1, pretraining (docs/paper.md (g), Table 10): only the modality-alignment modules train.

    python train.py --config=configs/nvlm_h_34b_pretrain.py --config.workdir=/ckpt/nvlm_h_34b_pretrain \\
        --config.checkpoint.init_from=/ckpt/nvlm_h_34b_init
    python -m nvlm_jax.training.plan --config=configs/nvlm_h_34b_pretrain.py --mesh=fsdp=64,tensor=8
    python train.py --config=configs/nvlm_h_34b_pretrain.py:runlocal       # the same stage, tiny model, CPU, ~1 minute

Backbones: InternViT-6B-448px-V1-5 (frozen in every stage) + Nous-Hermes-2-Yi-34B. Values from the paper's
Table 10 (docs/paper.md (g)); the mesh assumes 512 accelerators (64-way fsdp x 8-way tensor, the paper's TP 8).

NVLM-H pretrains with dynamic high resolution already (6 tiles + thumbnail).

init_from: InternViT-6B + Nous-Hermes-2-Yi-34B stitched by `python -m nvlm_jax.convert stitch`
(`--variant h`; new X-attention layers and MLP at init)
Data: fill `data.sources` with the pretraining blend of Table 4 (captioning, VQA, OCR, ...)
(blend weights are the user's choice; see docs/data.md).

The values are those of configs/nvlm_h_72b_pretrain.py (the paper's tables give one column per variant);
this file moves them to the 34B backbone.
"""

from nvlm_jax.training.config_base import on_yi_34b, runlocal, sibling_config


def get_config(arg=None):
  c = on_yi_34b(sibling_config(__file__, "nvlm_h_72b_pretrain"))
  if arg == "runlocal":
    c = runlocal(c, "tiny_nvlm_h")
  return c
