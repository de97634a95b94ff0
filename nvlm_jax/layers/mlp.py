"""Feed-forward blocks: SwiGLU (the LLM) and a two-layer GELU MLP (InternViT)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from nvlm_jax.layers.linear import Dense


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), no biases (Qwen2, Llama)."""

  hidden_size: int
  intermediate_size: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = Dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return Dense(self.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class GeluMLP(nn.Module):
  """fc2(gelu(fc1(x))) with biases and exact (erf) GELU, as InternViT's MLP."""

  hidden_size: int
  intermediate_size: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    h = nn.gelu(Dense(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x), approximate=False)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    return Dense(self.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)
