"""NVLM-X: cross-attention fusion. The decoder reads text; gated cross-attention blocks read the tiles.

    decoder stream:  ... <Image> <tile_1> P <tile_2> P ... <tile_global_thumbnail> P </Image> question ...
    key/value stream, per tile (all tiles, thumbnail included):  [tag token embeddings] + [256 image tokens]

P is the image-context placeholder, one per tile: the tile's anchor in the text (embedded as a zero vector;
its id may lie outside the vocabulary). Image features come from the shared pathway (InternViT -> pixel
shuffle -> projector; a one-layer projector 12800 -> 8192 at 72B, paper 4.5). A token sees the tiles whose
anchor precedes it; a tag's tokens see only their own tile; a token that sees nothing gets exactly the
LLM's update (cross_attention_inputs.py, gated_cross_attention.py, docs/fusion.md).

Params: `vision_model/` (InternViT), `projector/`, `language_model/` (CrossAttentionLM: embed_tokens,
decoder/groups/{layers_before, cross_attn, layers_after}, final_norm, lm_head).

Generation: the call that brings the images (the prefill) projects the key/value stream once per block and
stores it in cache["cross"]; later calls (decode steps, input_ids [B, 1]) reuse it. `nvlm_jax.generate`
works unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from nvlm_jax.fusion.base import NVLMBase
from nvlm_jax.fusion.cross_attention_inputs import (
  TileLayout,
  check_tile_layout,
  cross_attention_inputs,
  tile_layout,
)
from nvlm_jax.fusion.gated_cross_attention import CrossAttentionLM
from nvlm_jax.language.decoder import Cache


class CrossAttentionNVLM(NVLMBase):
  """What NVLM-X and NVLM-H share; subclasses say which tiles enter the decoder (`_cross_groups`,
  `_decoder_embeds`) and how placeholders group into tiles."""

  one_tile_per_placeholder: ClassVar[bool] = True

  def setup(self):
    self.setup_vision()
    self.language_model = CrossAttentionLM(self.config.llm, self.config.cross_attention)

  # ---- pieces ------------------------------------------------------------------------------------------

  def tile_layout(self, input_ids: jnp.ndarray, segment_ids: jnp.ndarray | None, num_tiles: int) -> TileLayout:
    cfg = self.config
    return tile_layout(
      input_ids,
      segment_ids,
      image_token_id=cfg.image_token_id,
      max_tiles=num_tiles,
      one_tile_per_placeholder=self.one_tile_per_placeholder,
      image_start_token_ids=cfg.image_start_token_ids,
      max_tag_tokens=cfg.cross_attention.max_tag_tokens,
    )

  def _cross_groups(self, layout: TileLayout) -> jnp.ndarray:
    """[B, T] bool per rank: this tile goes to cross-attention. NVLM-X: all of them."""
    return jnp.ones(layout.anchor.shape, bool)

  def _decoder_embeds(self, embeds, layout: TileLayout, features, tile_mask) -> jnp.ndarray:
    """Decoder input embeddings. NVLM-X: every placeholder (anchor) is a zero vector."""
    return jnp.where(layout.is_placeholder[..., None], jnp.zeros((), embeds.dtype), embeds)

  def _check(self, layout: TileLayout, tile_mask) -> None:
    cfg = self.config
    check_tile_layout(
      layout,
      tile_mask,
      image_token_id=cfg.image_token_id,
      max_tiles=tile_mask.shape[1],
      tokens_per_tile=None if self.one_tile_per_placeholder else cfg.tokens_per_tile,
      check_truncation=bool(cfg.image_start_token_ids),
      max_tag_tokens=cfg.cross_attention.max_tag_tokens,
      under_jit=cfg.debug_checks,
    )

  def prepare_inputs(
    self,
    input_ids: jnp.ndarray,
    pixel_values: jnp.ndarray | None = None,
    tile_mask: jnp.ndarray | None = None,
    *,
    image_features: jnp.ndarray | None = None,
    segment_ids: jnp.ndarray | None = None,
    tile_budget: int | None = None,
  ) -> tuple[jnp.ndarray, dict[str, Any] | None]:
    """(decoder input embeddings [B, L, D], cross-attention inputs or None for text only)."""
    cfg = self.config
    embeds, is_ph, pixel_values, tile_mask = self.embed_inputs(input_ids, pixel_values, tile_mask, image_features)
    if tile_mask is None:
      return jnp.where(is_ph[..., None], jnp.zeros((), embeds.dtype), embeds), None
    layout = self.tile_layout(input_ids, segment_ids, tile_mask.shape[1])
    if not self.is_initializing():
      self._check(layout, tile_mask)
    if image_features is None:
      image_features = self.encode_images(pixel_values, tile_mask, tile_budget=tile_budget)
    embeds = self._decoder_embeds(embeds, layout, image_features, tile_mask)
    cross = cross_attention_inputs(
      layout,
      embeds,
      image_features,
      tile_mask,
      segment_ids,
      cross_groups=self._cross_groups(layout),
      max_tag_tokens=cfg.cross_attention.max_tag_tokens,
    )
    cross["memory"] = nn.with_logical_constraint(
      cross["memory"], ("activation_batch", "activation_length", "activation_embed")
    )
    return embeds, cross

  # ---- the model ---------------------------------------------------------------------------------------
  def __call__(
    self,
    input_ids: jnp.ndarray,
    *,
    pixel_values: jnp.ndarray | None = None,
    tile_mask: jnp.ndarray | None = None,
    image_features: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    segment_ids: jnp.ndarray | None = None,
    cache: Cache | None = None,
    tile_budget: int | None = None,
    logits_to_keep: int = 0,
  ) -> Any:
    """logits [B, L, vocab]; with a cache, (logits, updated cache), exactly like CausalLM / NVLMD.

    Prefill with images: pass pixel_values and a fresh cache (`init_cache`); decode steps pass input_ids
    [B, 1] and the returned cache (the image keys/values stay in cache["cross"]).
    """
    embeds, cross = self.prepare_inputs(
      input_ids,
      pixel_values,
      tile_mask,
      image_features=image_features,
      segment_ids=segment_ids,
      tile_budget=tile_budget,
    )
    return self.language_model(
      inputs_embeds=embeds,
      positions=positions,
      segment_ids=segment_ids,
      cache=cache,
      cross=cross,
      logits_to_keep=logits_to_keep,
    )

  def init_cache(self, batch_size: int, max_length: int, dtype: str | None = None, num_tiles: int = 0) -> Cache:
    """An empty KV cache (works on bound and unbound modules). num_tiles: preallocate the image K/V for that
    many tile slots; 0 leaves it empty and the prefill call sizes it."""
    cfg = self.config
    keys = num_tiles * (cfg.cross_attention.max_tag_tokens + cfg.tokens_per_tile)
    lm = CrossAttentionLM(cfg.llm, cfg.cross_attention, parent=None)
    return lm.init_cache(batch_size, max_length, dtype, num_keys=keys)


class NVLMX(CrossAttentionNVLM):
  """NVLM-X (paper 4.3): every tile, thumbnail included, is read through gated cross-attention."""

  variant: ClassVar[str] = "x"
  one_tile_per_placeholder: ClassVar[bool] = True
