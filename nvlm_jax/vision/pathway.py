"""The vision pathway shared by NVLM-D, -X and -H: tiles -> ViT -> pixel shuffle -> projector.

    pixel_values [B, T, H, W, 3], tile_mask [B, T]  ->  image features [B, T, tokens_per_tile, D_llm]

T is the static tile budget per sample (e.g. 7 = 6 tiles + thumbnail); `tile_mask` marks the real tiles.
Padded tiles never contribute: their pixels are zeroed before the ViT (so no NaN/inf from garbage can
leak into gradients) and their features are zeroed after the projector.

By default every one of the B*T tile slots goes through the ViT. `tile_budget=K` instead runs the ViT and
projector on K slots only: the valid tiles are moved to the front (stable, so order is kept), the first
K are encoded, and the results are put back in their slots. Valid tiles beyond K are dropped (their
features stay zero), so K must bound the number of valid tiles in the batch; `NVLMD` checks this when
its inputs are concrete. With short samples (1-2 tiles of 7) this saves most of the ViT FLOPs.

The functions take the (bound) submodules as arguments, so each fusion model keeps the flat parameter
tree `vision_model/`, `projector/`, `language_model/` that mirrors the checkpoints.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvlm_jax.config import NVLMConfig
from nvlm_jax.vision.intern_vit import InternViT
from nvlm_jax.vision.pixel_shuffle import pixel_shuffle
from nvlm_jax.vision.projector import Projector


def make_vision_modules(config: NVLMConfig) -> tuple[InternViT, Projector]:
  """The two vision submodules, for a fusion model's `setup` (names: vision_model, projector)."""
  return InternViT(config.vision), Projector(config.projector)


def encode_tiles(
  vision_model: nn.Module,
  projector: nn.Module,
  tiles: jnp.ndarray,
  *,
  downsample_ratio: float,
  ps_version: str = "v2",
  freeze_vision: bool = True,
) -> jnp.ndarray:
  """tiles [N, H, W, 3] -> [N, tokens_per_tile, D_llm]: ViT (class token dropped) -> shuffle -> projector.

  freeze_vision: stop_gradient on the ViT output, so no gradient (and no backward ViT compute) flows
  into the frozen encoder.
  """
  features = vision_model(tiles)
  if freeze_vision:
    features = jax.lax.stop_gradient(features)
  features = pixel_shuffle(features, downsample_ratio, ps_version)
  features = nn.with_logical_constraint(features, ("activation_batch", "activation_length", "activation_embed"))
  return projector(features)


def encode_images(
  vision_model: nn.Module,
  projector: nn.Module,
  pixel_values: jnp.ndarray,
  tile_mask: jnp.ndarray | None = None,
  *,
  downsample_ratio: float = 0.5,
  ps_version: str = "v2",
  freeze_vision: bool = True,
  tile_budget: int | None = None,
) -> jnp.ndarray:
  """pixel_values [B, T, H, W, 3], tile_mask [B, T] (None: all valid) -> [B, T, tokens_per_tile, D_llm].

  Features of padded tiles are exactly zero. See the module docstring for `tile_budget`.
  """
  if pixel_values.ndim != 5:
    raise ValueError(f"pixel_values must be [batch, tiles, H, W, C], got shape {pixel_values.shape}")
  batch, tiles = pixel_values.shape[:2]
  if tile_mask is None:
    tile_mask = jnp.ones((batch, tiles), bool)
  if tile_mask.shape != (batch, tiles):
    raise ValueError(f"tile_mask shape {tile_mask.shape} does not match pixel_values {pixel_values.shape[:2]}")
  total = batch * tiles
  flat = pixel_values.reshape((total,) + pixel_values.shape[2:])
  valid = tile_mask.reshape(total).astype(bool)
  flat = jnp.where(valid[:, None, None, None], flat, jnp.zeros((), flat.dtype))
  encode = lambda x: encode_tiles(
    vision_model, projector, x, downsample_ratio=downsample_ratio, ps_version=ps_version, freeze_vision=freeze_vision
  )
  if tile_budget is None or tile_budget >= total:
    features = encode(flat)
  else:
    if tile_budget < 1:
      raise ValueError(f"tile_budget must be >= 1, got {tile_budget}")
    slots = jnp.argsort(~valid, stable=True)[:tile_budget]  # valid tile slots first, in order
    encoded = encode(jnp.take(flat, slots, axis=0))
    encoded = jnp.where(valid[slots][:, None, None], encoded, jnp.zeros((), encoded.dtype))
    features = jnp.zeros((total,) + encoded.shape[1:], encoded.dtype).at[slots].set(encoded)
  features = jnp.where(valid[:, None, None], features, jnp.zeros((), features.dtype))
  return features.reshape((batch, tiles) + features.shape[1:])
