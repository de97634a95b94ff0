"""NVLM-H: hybrid fusion. The thumbnail's image tokens enter the decoder (as in NVLM-D); the regular tiles,
with their tag embeddings, are read through gated cross-attention (as in NVLM-X). Paper 4.4.

    decoder stream:  ... <Image> <tile_1> P ... <tile_6> P <tile_global_thumbnail> P*256 </Image> question ...
    key/value stream, per regular tile:  [tag token embeddings] + [256 image tokens]

Each maximal run of placeholders is one tile (the tags separate them): a run of one placeholder is a
regular tile's anchor (a zero vector in the decoder, its tile goes to cross-attention); a run of
tokens_per_tile placeholders receives that tile's image tokens in the decoder (the thumbnail, or the single
tile of a 1x1 image). The two-layer projector (12800 -> 29568 -> 8192 at 72B) serves both paths. Everything
else (masks, cache, parameter tree) is NVLM-X's: nvlm_x.py, docs/fusion.md.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from nvlm_jax.fusion.cross_attention_inputs import TileLayout, tile_ranks
from nvlm_jax.fusion.nvlm_x import CrossAttentionNVLM


class NVLMH(CrossAttentionNVLM):
  """NVLM-H: thumbnail tokens in the decoder, regular tiles through gated cross-attention."""

  variant: ClassVar[str] = "h"
  one_tile_per_placeholder: ClassVar[bool] = False

  def _cross_groups(self, layout: TileLayout) -> jnp.ndarray:
    return layout.run_length == 1

  def _decoder_embeds(self, embeds, layout: TileLayout, features, tile_mask) -> jnp.ndarray:
    """Runs longer than one placeholder take their tile's image tokens (token p - anchor of the run);
    single-placeholder runs (anchors) become zero vectors."""
    batch, tiles, per_tile, dim = features.shape
    group = layout.group_of
    rank = jnp.clip(group, 0, tiles - 1)
    anchor = jnp.take_along_axis(layout.anchor, rank, axis=1)
    run = jnp.take_along_axis(layout.run_length, rank, axis=1)
    _, slot_of_rank = tile_ranks(tile_mask)
    slot = jnp.take_along_axis(slot_of_rank, rank, axis=1)
    token = jnp.arange(group.shape[1], dtype=jnp.int32)[None] - anchor
    num_valid = jnp.sum(tile_mask, axis=1, dtype=jnp.int32)[:, None]
    take = (group >= 0) & (group < jnp.minimum(num_valid, tiles)) & (run > 1) & (token >= 0) & (token < per_tile)
    source = jnp.where(take, slot * per_tile + token, 0)
    gathered = jnp.take_along_axis(features.reshape(batch, tiles * per_tile, dim), source[..., None], axis=1)
    out = jnp.where(layout.is_placeholder[..., None], jnp.zeros((), embeds.dtype), embeds)
    return jnp.where(take[..., None], gathered.astype(embeds.dtype), out)
