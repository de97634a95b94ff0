"""Model hyper-parameters as frozen dataclasses.

Frozen dataclasses are hashable, so they can be attributes of flax modules and static arguments of
`jax.jit`. Experiment settings (optimizer, data, mesh) live in ml_collections files under configs/;
those files name or build one of these model configs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


def as_dtype(name: str | Any) -> jnp.dtype:
  """'bfloat16' -> jnp.bfloat16; dtypes pass through. Configs store names so they serialize."""
  return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A Qwen2- or Llama-family decoder (GQA, RoPE, RMSNorm, SwiGLU)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True  # Qwen2: True; Llama/Yi: False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Implementation switches (not architecture).
  scan_layers: bool = True
  remat_policy: str = "none"  # see nvlm_jax.layers.remat.POLICIES
  dtype: str = "float32"  # activation / compute dtype
  param_dtype: str = "float32"

  @property
  def kv_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA)")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
          "set head_dim explicitly")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """InternViT (spec a.1): conv patch embedding, class token + learned positions, pre-norm blocks
  with layer scale, optional q/k normalization over the full hidden width, no final norm.

  `select_layer` picks the hidden state handed to the projector, indexed like HF `hidden_states`
  (0 = embeddings, k = output of layer k, -1 = last layer, -2 = second to last, ...).
  """

  image_size: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  num_channels: int = 3
  norm_type: str = "rms_norm"  # 'rms_norm' (InternViT-6B) | 'layer_norm' (InternViT-300M, HF default)
  layer_norm_eps: float = 1e-6  # block norms and the q/k norms (InternViT uses one eps for both)
  qk_normalization: bool = True
  qkv_bias: bool = False
  use_class_token: bool = True
  layer_scale_init: float = 0.1  # init of ls1/ls2 (InternViT `initializer_factor`); checkpoints override
  select_layer: int = -1
  # Implementation switches (not architecture).
  scan_layers: bool = True
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid_size(self) -> int:
    """Patches per side of one tile."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + int(self.use_class_token)

  @property
  def depth(self) -> int:
    """How many encoder layers `select_layer` actually needs to run."""
    return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

  def replace(self, **changes) -> "VisionConfig":
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.norm_type not in ("rms_norm", "layer_norm"):
      raise ValueError(f"norm_type={self.norm_type!r}; expected 'rms_norm' or 'layer_norm'")
    if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
      raise ValueError(f"select_layer={self.select_layer} out of range for {self.num_layers} layers "
                       f"(valid: {-(self.num_layers + 1)}..{self.num_layers})")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Vision -> LLM projector on pixel-shuffled features (in_features = vision hidden * 4).

  num_layers=2: LayerNorm -> Linear(in, hidden) -> GELU(exact) -> Linear(hidden, out).
    NVLM-D / NVLM-H `mlp1`: hidden = LLM intermediate size (12800 -> 29568 -> 8192), no biases.
    transformers InternVL `multi_modal_projector`: hidden = out = LLM hidden size, with biases.
  num_layers=1: LayerNorm -> Linear(in, out) (NVLM-X "one-layer MLP", paper 4.5; the paper does not say
    whether a LayerNorm precedes it: we keep it, as every other NVLM projector normalizes its input).
  """

  in_features: int
  hidden_size: int  # intermediate width (ignored when num_layers == 1)
  out_features: int
  num_layers: int = 2
  use_bias: bool = False
  layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default, as the HF ports (Megatron used 1e-6)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def replace(self, **changes) -> "ProjectorConfig":
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    if self.num_layers not in (1, 2):
      raise ValueError(f"projector num_layers={self.num_layers}; expected 1 (NVLM-X) or 2 (mlp2)")


NVLM_VARIANTS = ("d", "x", "h")


@dataclasses.dataclass(frozen=True)
class NVLMConfig:
  """A whole NVLM model: shared vision pathway (ViT -> pixel shuffle -> projector) + decoder.

  variant 'd': image tokens replace placeholder ids in the decoder stream (NVLM-D).
  variant 'x' / 'h': gated cross-attention (+ thumbnail tokens for 'h'); their settings are added
  below this block by the NVLM-X/H work.
  """

  variant: str
  vision: VisionConfig
  projector: ProjectorConfig
  llm: DecoderConfig
  image_token_id: int  # placeholder id repeated tokens_per_tile times per tile (may lie outside the vocab)
  downsample_ratio: float = 0.5  # pixel shuffle: 1/ratio^2 neighbouring tokens concatenated per token
  ps_version: str = "v2"  # pixel shuffle token order; 'v1' (transposed) is not what NVLM was trained with
  max_tiles: int = 6  # regular DHR tiles per image (spec b)
  use_thumbnail: bool = True  # + a global thumbnail when an image has more than one tile
  freeze_vision: bool = True  # stop_gradient on the ViT output (frozen in every NVLM stage)
  debug_checks: bool = False  # also check placeholder counts under jit (host callback; off by default)

  @property
  def tokens_per_tile(self) -> int:
    side = self.vision.grid_size * self.downsample_ratio
    return int(round(side)) ** 2

  @property
  def max_tiles_per_image(self) -> int:
    return self.max_tiles + int(self.use_thumbnail and self.max_tiles > 1)

  def replace(self, **changes) -> "NVLMConfig":
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    if self.variant not in NVLM_VARIANTS:
      raise ValueError(f"variant={self.variant!r}; expected one of {NVLM_VARIANTS}")
    if self.ps_version not in ("v1", "v2"):
      raise ValueError(f"ps_version={self.ps_version!r}; expected 'v1' or 'v2'")
    factor = 1.0 / self.downsample_ratio
    if abs(factor - round(factor)) > 1e-9 or round(factor) < 1:
      raise ValueError(f"downsample_ratio={self.downsample_ratio} must be 1/k for an integer k")
    factor = int(round(factor))
    if self.vision.grid_size % factor:
      raise ValueError(f"vision grid {self.vision.grid_size}x{self.vision.grid_size} is not divisible by the "
                       f"pixel-shuffle factor {factor} (downsample_ratio={self.downsample_ratio})")
    expected_in = self.vision.hidden_size * factor * factor
    if self.projector.in_features != expected_in:
      raise ValueError(f"projector.in_features={self.projector.in_features}, expected vision hidden "
                       f"{self.vision.hidden_size} x {factor * factor} = {expected_in}")
    if self.projector.out_features != self.llm.hidden_size:
      raise ValueError(f"projector.out_features={self.projector.out_features} != llm.hidden_size="
                       f"{self.llm.hidden_size}")
