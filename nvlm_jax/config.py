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
