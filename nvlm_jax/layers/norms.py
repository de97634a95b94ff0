"""RMSNorm and LayerNorm with fp32 statistics (as the PyTorch references compute them)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """y = scale * x / rms(x), statistics in fp32, result cast back before the scale (HF order)."""

  epsilon: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      (x.shape[-1],),
      jnp.dtype(self.param_dtype),
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
  """Affine LayerNorm with fp32 statistics."""

  epsilon: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    features = x.shape[-1]
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (features,), jnp.dtype(self.param_dtype)
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (features,), jnp.dtype(self.param_dtype)
    )
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(kind: str, epsilon: float, dtype: str, param_dtype: str, name: str | None = None) -> nn.Module:
  """'rms_norm' or 'layer_norm' (the names InternViT and transformers configs use)."""
  if kind == "rms_norm":
    return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "layer_norm":
    return LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"unknown norm type {kind!r}; expected 'rms_norm' or 'layer_norm'")
