"""What every NVLM variant shares: the vision pathway, image encoding and the checks on the model inputs.

NVLM-D (nvlm_d.py) puts the encoded tiles into the decoder stream, NVLM-X / NVLM-H (nvlm_x.py, nvlm_h.py) into
gated cross-attention; each file holds only that difference.
"""

from __future__ import annotations

from typing import ClassVar

import chex
import flax.linen as nn
import jax.numpy as jnp

from nvlm_jax.config import NVLMConfig
from nvlm_jax.vision.pathway import encode_images, make_vision_modules


class NVLMBase(nn.Module):
  """InternViT + projector (`vision_model/`, `projector/`) and the input handling of D, X and H; a subclass
  names its `variant`, creates `language_model` in setup after `setup_vision()`."""

  config: NVLMConfig
  variant: ClassVar[str] = ""

  def setup_vision(self):
    cfg = self.config
    if cfg.variant != self.variant:
      raise ValueError(f"{type(self).__name__} needs an NVLMConfig with variant {self.variant!r}, got {cfg.variant!r}")
    self.vision_model, self.projector = make_vision_modules(cfg)

  def encode_images(
    self, pixel_values: jnp.ndarray, tile_mask: jnp.ndarray | None = None, *, tile_budget: int | None = None
  ) -> jnp.ndarray:
    """[B, T, H, W, 3] (+ [B, T] mask) -> [B, T, tokens_per_tile, D]; padded tiles give zeros."""
    cfg = self.config
    return encode_images(
      self.vision_model,
      self.projector,
      pixel_values,
      tile_mask,
      downsample_ratio=cfg.downsample_ratio,
      ps_version=cfg.ps_version,
      freeze_vision=cfg.freeze_vision,
      tile_budget=tile_budget,
    )

  def embed_inputs(
    self,
    input_ids: jnp.ndarray,
    pixel_values: jnp.ndarray | None,
    tile_mask: jnp.ndarray | None,
    image_features: jnp.ndarray | None,
  ):
    """(token embeddings [B, L, D], placeholder mask [B, L], pixel_values, tile_mask [B, T]).

    Placeholder ids may lie outside the vocabulary (Megatron's `<image>`): they are never looked up. Give
    pixel_values or precomputed image_features [B, T, N, D], or neither for text only (then tile_mask is
    returned as None). tile_mask defaults to every tile valid. At init with text only, one blank tile creates
    the vision parameters.
    """
    cfg = self.config
    chex.assert_rank(input_ids, 2)
    batch = input_ids.shape[0]
    if pixel_values is None and image_features is None and self.is_initializing():
      v = cfg.vision
      pixel_values = jnp.zeros((batch, 1, v.image_size, v.image_size, v.num_channels), jnp.float32)
      tile_mask = jnp.zeros((batch, 1), bool)
    is_placeholder = input_ids == cfg.image_token_id
    embeds = self.language_model.embed(jnp.where(is_placeholder, 0, input_ids))
    if pixel_values is None and image_features is None:
      return embeds, is_placeholder, None, None
    if pixel_values is not None and image_features is not None:
      raise ValueError("pass pixel_values or image_features, not both")
    if image_features is None:
      chex.assert_rank(pixel_values, 5)
      chex.assert_axis_dimension(pixel_values, 0, batch)
      tiles = pixel_values.shape[1]
    else:
      chex.assert_shape(image_features, (batch, None, cfg.tokens_per_tile, cfg.llm.hidden_size))
      tiles = image_features.shape[1]
    if tile_mask is None:
      tile_mask = jnp.ones((batch, tiles), bool)
    chex.assert_shape(tile_mask, (batch, tiles))
    return embeds, is_placeholder, pixel_values, tile_mask
