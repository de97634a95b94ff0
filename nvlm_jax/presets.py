"""Named model configurations with the published hyper-parameters (spec sections a, c, d, h).

`get_preset(name, **overrides)` returns a frozen config; overrides replace top-level fields, e.g.
`get_preset("nvlm_d_72b", freeze_vision=False)` or `get_preset("qwen2_72b_instruct", scan_layers=False)`.
The tiny presets keep every structural feature (GQA, q/k norm, class token, layer scale, a square
pixel-shuffle grid, 2-layer bias-free projector) at sizes that run on a laptop CPU in milliseconds.

Values the sources leave open, and what we chose:
- NVLM-D-72B placeholder id: 151654 (`<|vision_pad|>` in the Qwen2-VL vocabulary layout; docs/paper.md (e):
  open point 3 for the NVLM tokenizer). The processor should pass the id its tokenizer actually has.
- Nous-Hermes-2-Yi-34B rms_norm_eps: 1e-5. Megatron's NVLM 34B scripts pass no --norm-epsilon, so its
  default 1e-5 applies; Yi-34B's HF config uses the same value. Yi has no qkv bias and untied embeddings.
- NVLM-D-34B placeholder id: 64000, one past the 64000-entry Yi vocabulary, where Megatron's
  MultimodalTokenizer appends its `<image>` token; NVLMD never looks placeholder ids up in the table.
- The ViT is stored with its 25 real heads (the checkpoint's 7 zero dummy heads are sliced off at
  import, docs/paper.md a.2).
- NVLM-X / NVLM-H (no released weights; docs/fusion.md): 10 gated cross-attention blocks, one per `every`
  LLM layers (8 at 72B, 6 at 34B), each just before the last LLM layer of its group (offset every - 1);
  heads and FFN width of the LLM; projector one layer for X (12800 -> 8192 / 7168), `mlp1` for H.
  Placeholder ids as NVLM-D's; `image_start_token_ids` (the ids of `<Image>`) depend on the tokenizer and
  are left empty here: `convert stitch` fills them from the tokenizer files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from nvlm_jax.config import CrossAttentionConfig, DecoderConfig, NVLMConfig, ProjectorConfig, RopeScaling, VisionConfig


def internvit_6b_448px_v1_5() -> VisionConfig:
  """InternViT-6B-448px-V1-5 (docs/paper.md a.1): 45 layers, 3200 wide, 25 heads of 128, RMSNorm, q/k norm."""
  return VisionConfig(
    image_size=448,
    patch_size=14,
    hidden_size=3200,
    num_layers=45,
    num_heads=25,
    intermediate_size=12800,
    norm_type="rms_norm",
    layer_norm_eps=1e-6,
    qk_normalization=True,
    qkv_bias=False,
    use_class_token=True,
    select_layer=-1,
    dtype="bfloat16",
    param_dtype="bfloat16",
  )


def qwen2_72b_instruct() -> DecoderConfig:
  """Qwen2-72B-Instruct (docs/paper.md (d))."""
  return DecoderConfig(
    vocab_size=152064,
    hidden_size=8192,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    intermediate_size=29568,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,
    tie_word_embeddings=False,
    max_position_embeddings=32768,
    bos_token_id=151643,
    eos_token_id=151645,
    pad_token_id=151643,
    dtype="bfloat16",
    param_dtype="bfloat16",
  )


def nous_hermes_2_yi_34b() -> DecoderConfig:
  """Nous-Hermes-2-Yi-34B, the NVLM 34B backbone (docs/paper.md (d), last row; eps see module docstring)."""
  return DecoderConfig(
    vocab_size=64000,
    hidden_size=7168,
    num_layers=60,
    num_heads=56,
    num_kv_heads=8,
    intermediate_size=20480,
    rope_theta=5_000_000.0,
    rms_norm_eps=1e-5,
    qkv_bias=False,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=7,
    dtype="bfloat16",
    param_dtype="bfloat16",
  )


def nvlm_d_72b() -> NVLMConfig:
  """NVLM-D-72B: InternViT-6B + mlp1 12800 -> 29568 -> 8192 + Qwen2-72B-Instruct, with the dynamic NTK RoPE
  scaling (factor 3) of the released `llm_config` (identical to plain RoPE up to 32,768 tokens)."""
  vision = internvit_6b_448px_v1_5()
  llm = qwen2_72b_instruct().replace(rope_scaling=RopeScaling("dynamic", factor=3.0))
  return NVLMConfig(
    variant="d", vision=vision, projector=ProjectorConfig.mlp1(vision, llm), llm=llm, image_token_id=151654
  )


def nvlm_d_34b() -> NVLMConfig:
  """NVLM-D-34B: InternViT-6B + mlp1 12800 -> 20480 -> 7168 + Nous-Hermes-2-Yi-34B."""
  vision, llm = internvit_6b_448px_v1_5(), nous_hermes_2_yi_34b()
  return NVLMConfig(
    variant="d", vision=vision, projector=ProjectorConfig.mlp1(vision, llm), llm=llm, image_token_id=64000
  )


def _one_layer_projector(vision: VisionConfig, llm: DecoderConfig, ratio: float = 0.5) -> ProjectorConfig:
  """NVLM-X's "one-layer MLP" (paper 4.5): LayerNorm -> Linear(4*Dv, llm hidden), no bias."""
  return dataclasses.replace(ProjectorConfig.mlp1(vision, llm, ratio), num_layers=1, hidden_size=llm.hidden_size)


def _cross_attention(every: int) -> CrossAttentionConfig:
  return CrossAttentionConfig(every=every, offset=every - 1, max_tag_tokens=8)


def nvlm_x_72b() -> NVLMConfig:
  """NVLM-X-72B: InternViT-6B + one-layer projector 12800 -> 8192 + Qwen2-72B-Instruct + 10 gated
  cross-attention blocks (one per 8 layers)."""
  vision, llm = internvit_6b_448px_v1_5(), qwen2_72b_instruct()
  return NVLMConfig(
    variant="x",
    vision=vision,
    projector=_one_layer_projector(vision, llm),
    llm=llm,
    image_token_id=151654,
    cross_attention=_cross_attention(8),
  )


def nvlm_h_72b() -> NVLMConfig:
  """NVLM-H-72B: InternViT-6B + mlp1 12800 -> 29568 -> 8192 + Qwen2-72B-Instruct + 10 gated blocks."""
  vision, llm = internvit_6b_448px_v1_5(), qwen2_72b_instruct()
  return NVLMConfig(
    variant="h",
    vision=vision,
    projector=ProjectorConfig.mlp1(vision, llm),
    llm=llm,
    image_token_id=151654,
    cross_attention=_cross_attention(8),
  )


def nvlm_x_34b() -> NVLMConfig:
  """NVLM-X-34B: InternViT-6B + one-layer projector 12800 -> 7168 + Nous-Hermes-2-Yi-34B + 10 gated
  cross-attention blocks (one per 6 layers)."""
  vision, llm = internvit_6b_448px_v1_5(), nous_hermes_2_yi_34b()
  return NVLMConfig(
    variant="x",
    vision=vision,
    projector=_one_layer_projector(vision, llm),
    llm=llm,
    image_token_id=64000,
    cross_attention=_cross_attention(6),
  )


def nvlm_h_34b() -> NVLMConfig:
  """NVLM-H-34B: InternViT-6B + mlp1 12800 -> 20480 -> 7168 + Nous-Hermes-2-Yi-34B + 10 gated blocks."""
  vision, llm = internvit_6b_448px_v1_5(), nous_hermes_2_yi_34b()
  return NVLMConfig(
    variant="h",
    vision=vision,
    projector=ProjectorConfig.mlp1(vision, llm),
    llm=llm,
    image_token_id=64000,
    cross_attention=_cross_attention(6),
  )


def tiny_vit() -> VisionConfig:
  """56px tiles, 7px patches: 8x8 grid -> 4x4 = 16 tokens per tile after pixel shuffle."""
  return VisionConfig(
    image_size=56,
    patch_size=7,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    norm_type="rms_norm",
    layer_norm_eps=1e-6,
    qk_normalization=True,
    qkv_bias=False,
    use_class_token=True,
  )


def tiny_llm() -> DecoderConfig:
  return DecoderConfig(
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=96,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )


def tiny_nvlm_d() -> NVLMConfig:
  """tiny_vit + 2-layer projector (128 -> 96 -> 64) + tiny_llm; placeholder id 255, 16 tokens per tile."""
  vision, llm = tiny_vit(), tiny_llm()
  return NVLMConfig(
    variant="d", vision=vision, projector=ProjectorConfig.mlp1(vision, llm), llm=llm, image_token_id=255
  )


def tiny_nvlm_x() -> NVLMConfig:
  """tiny_vit + one-layer projector (128 -> 64) + a 4-layer tiny_llm with 2 gated cross-attention blocks
  (before layers 1 and 3: every=2, offset=1); placeholder id 255, 16 tokens per tile."""
  vision, llm = tiny_vit(), tiny_llm().replace(num_layers=4)
  return NVLMConfig(
    variant="x",
    vision=vision,
    projector=_one_layer_projector(vision, llm),
    llm=llm,
    image_token_id=255,
    cross_attention=_cross_attention(2),
  )


def tiny_nvlm_h() -> NVLMConfig:
  """tiny_nvlm_x's shapes with the 2-layer projector (128 -> 96 -> 64) and variant 'h'."""
  vision, llm = tiny_vit(), tiny_llm().replace(num_layers=4)
  return NVLMConfig(
    variant="h",
    vision=vision,
    projector=ProjectorConfig.mlp1(vision, llm),
    llm=llm,
    image_token_id=255,
    cross_attention=_cross_attention(2),
  )


PRESETS: dict[str, Callable[[], Any]] = {
  "internvit_6b_448px_v1_5": internvit_6b_448px_v1_5,
  "qwen2_72b_instruct": qwen2_72b_instruct,
  "nous_hermes_2_yi_34b": nous_hermes_2_yi_34b,
  "nvlm_d_72b": nvlm_d_72b,
  "nvlm_d_34b": nvlm_d_34b,
  "tiny_vit": tiny_vit,
  "tiny_llm": tiny_llm,
  "tiny_nvlm_d": tiny_nvlm_d,
  "nvlm_x_72b": nvlm_x_72b,
  "nvlm_h_72b": nvlm_h_72b,
  "nvlm_x_34b": nvlm_x_34b,
  "nvlm_h_34b": nvlm_h_34b,
  "tiny_nvlm_x": tiny_nvlm_x,
  "tiny_nvlm_h": tiny_nvlm_h,
}


def get_preset(name: str, **overrides):
  """The named config, with top-level fields replaced by `overrides`."""
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
  config = PRESETS[name]()
  return dataclasses.replace(config, **overrides) if overrides else config
