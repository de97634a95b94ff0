"""Pixel shuffle: fold each k x k block of neighbouring ViT tokens into one token (docs/paper.md c.1).

With scale 0.5 (k = 2) a 32x32 grid of 3200-wide tokens becomes 16x16 tokens of width 12800, so a
448px tile costs 256 decoder positions instead of 1024.

Closed form (version 2, what NVLM-D was trained with, and what transformers' InternVL computes):
    out[n, r*G + c, (dr*k + dc)*C + ch] = in[n, (k*r + dr)*g + (k*c + dc), ch]
for an input grid of g x g tokens (row-major, as the conv patch embedding flattens them), G = g / k,
0 <= dr, dc < k. Version 1 (InternVL's `ps_version='v1'`) has the same channel layout but emits the
output tokens column-major (out token c*G + r); it is kept only to read old InternVL checkpoints.
"""

from __future__ import annotations

import jax.numpy as jnp


def shuffle_factor(scale: float) -> int:
  """scale 0.5 -> 2. The scale must be 1/k for an integer k >= 1."""
  factor = 1.0 / scale
  k = int(round(factor))
  if k < 1 or abs(factor - k) > 1e-9:
    raise ValueError(f"pixel shuffle scale {scale} must be 1/k for an integer k")
  return k


def pixel_shuffle(x: jnp.ndarray, scale: float = 0.5, version: str = "v2") -> jnp.ndarray:
  """x [N, g*g, C] (a square token grid, row-major) -> [N, (g*scale)^2, C / scale^2]."""
  if x.ndim != 3:
    raise ValueError(f"pixel_shuffle expects [N, tokens, channels], got shape {x.shape}")
  n, tokens, channels = x.shape
  g = int(round(tokens**0.5))
  if g * g != tokens:
    raise ValueError(f"pixel_shuffle needs a square token grid, got {tokens} tokens")
  k = shuffle_factor(scale)
  if g % k:
    raise ValueError(f"token grid {g}x{g} is not divisible by the pixel shuffle factor {k}")
  big = g // k
  # [n, r, dr, c, dc, C]: token (k*r + dr, k*c + dc).
  x = x.reshape(n, big, k, big, k, channels)
  if version == "v2":
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [n, r, c, dr, dc, C]: row-major output tokens
  elif version == "v1":
    x = x.transpose(0, 3, 1, 2, 4, 5)  # [n, c, r, dr, dc, C]: column-major output tokens
  else:
    raise ValueError(f"pixel shuffle version {version!r}; expected 'v1' or 'v2'")
  return x.reshape(n, big * big, k * k * channels)
