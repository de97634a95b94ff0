"""Rotary position embedding, half-split ("rotate_half") layout as in Qwen2/Llama checkpoints, with the
RoPE scaling variants Hugging Face configs name in `rope_scaling` / `rope_parameters` (`RopeScaling`).

Frequencies follow transformers' definitions (`modeling_rope_utils`), so an imported checkpoint computes
what it computes there:
- default: inv_freq_i = theta^(-2i/d).
- linear: inv_freq / factor (positions interpolated by `factor`).
- dynamic (NTK-aware): unscaled up to max_position_embeddings M; for a call whose largest position is
  L - 1 with L > M, the base becomes theta * (factor * L / M - (factor - 1))^(d / (d - 2)). L is read from
  the traced positions, so it works under jit, and in cached generation each decode step uses its own
  length (the new token's position + 1) while the cached keys keep the rotation they were written with:
  transformers' dynamic RoPE does exactly this during `generate`.
- llama3: low frequencies divided by factor, high ones kept, a smooth ramp in between.
- yarn: per-frequency blend of interpolation and extrapolation, and cos/sin scaled by an attention factor.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from nvlm_jax.config import RopeScaling


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
  """Everything RoPE needs (hashable, so it can be a flax module attribute)."""

  theta: float
  scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 32768

  def inverse_frequencies(self, head_dim: int, positions: jnp.ndarray) -> tuple[jnp.ndarray, float]:
    """(inv_freq [head_dim/2] fp32, cos/sin multiplier) for a call at these positions."""
    s = self.scaling
    if s.rope_type == "dynamic":
      return _dynamic_ntk(self.theta, head_dim, s.factor, self.max_position_embeddings, positions), 1.0
    base = _unscaled(self.theta, head_dim)
    if s.rope_type == "default":
      return jnp.asarray(base), 1.0
    if s.rope_type == "linear":
      return jnp.asarray(base / np.float32(s.factor)), 1.0
    original = s.original_max_position_embeddings or self.max_position_embeddings
    if s.rope_type == "llama3":
      return jnp.asarray(_llama3(base, s, original)), 1.0
    if s.rope_type == "yarn":
      return _yarn(self.theta, head_dim, s, original, self.max_position_embeddings)
    raise ValueError(f"unknown rope_type {s.rope_type!r}")


def _unscaled(theta: float, head_dim: int) -> np.ndarray:
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def _dynamic_ntk(theta: float, head_dim: int, factor: float, max_positions: int, positions: jnp.ndarray) -> jnp.ndarray:
  """NTK base growth from the current length (largest position + 1, never below max_positions)."""
  length = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, float(max_positions))
  growth = (factor * length / max_positions - (factor - 1.0)) ** (head_dim / (head_dim - 2))
  base = theta * growth
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (base**exponents)


def _llama3(inv_freq: np.ndarray, s: RopeScaling, original: int) -> np.ndarray:
  """Llama 3.1: wavelengths above original/low_freq_factor are stretched by factor, below
  original/high_freq_factor kept, and linearly blended (in original/wavelength) in between."""
  wavelength = 2 * math.pi / inv_freq
  long_limit, short_limit = original / s.low_freq_factor, original / s.high_freq_factor
  stretched = np.where(wavelength > long_limit, inv_freq / s.factor, inv_freq)
  blend = (original / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - blend) * stretched / s.factor + blend * stretched
  medium = (wavelength >= short_limit) & (wavelength <= long_limit)
  return np.where(medium, smoothed, stretched).astype(np.float32)


def _yarn(theta: float, head_dim: int, s: RopeScaling, original: int, max_positions: int) -> tuple[jnp.ndarray, float]:
  """YaRN: dimensions rotating fewer than beta_slow times over the original context are interpolated
  (divided by factor), more than beta_fast times extrapolated (kept), a linear ramp between; cos/sin
  are multiplied by the attention factor (0.1 ln(factor) + 1 unless the config gives it)."""
  factor = s.factor if s.factor is not None else max_positions / original

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention = s.attention_factor
  if attention is None:
    attention = (
      mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim) if s.mscale and s.mscale_all_dim else mscale(factor)
    )
  beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

  def dim_for(rotations):  # the dimension index that rotates `rotations` times over `original` positions
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = dim_for(beta_fast), dim_for(beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  powers = np.power(np.float32(theta), np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  extrapolated, interpolated = np.float32(1) / powers, np.float32(1) / (np.float32(factor) * powers)
  keep = np.float32(1) - ramp  # weight of the extrapolated (unscaled) frequency
  return jnp.asarray((interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)), float(attention)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, rope: float | RotaryEmbedding) -> jnp.ndarray:
  """Rotates x [B, L, heads, head_dim] by integer positions [B, L]; angles computed in fp32.

  rope: a RotaryEmbedding, or a bare base frequency (unscaled RoPE)."""
  if not isinstance(rope, RotaryEmbedding):
    rope = RotaryEmbedding(float(rope))
  inv_freq, scale = rope.inverse_frequencies(x.shape[-1], positions)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
