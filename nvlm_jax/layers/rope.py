"""Rotary position embedding, half-split ("rotate_half") layout as in Qwen2/Llama checkpoints."""
from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, theta: float) -> jnp.ndarray:
  """Rotates x [B, L, heads, head_dim] by integer positions [B, L]; angles computed in fp32."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
