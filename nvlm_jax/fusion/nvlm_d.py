"""NVLM-D: decoder-only fusion. Image tokens take the place of placeholder ids in the decoder stream.

The processor writes, per tile, `tokens_per_tile` copies of the placeholder id (`<|vision_pad|>` for
NVLM-D-72B) after the tile's text tag. Here the k-th valid tile of a row fills the k-th run of
`tokens_per_tile` placeholders of that row, in tile order (docs/paper.md (e); transformers' `masked_scatter` does the
same over the flattened batch). Everything has static shapes: the placeholder ordinal of each position is
a cumsum, and the image embedding is a gather from [B, T * tokens_per_tile, D].

Placeholder count contract (per row): #placeholders == #valid tiles * tokens_per_tile. Checked when the
inputs are concrete (eager calls: free), and under jit only with `config.debug_checks` (one host
callback per call). If it is violated anyway, surplus placeholders keep their token embedding and
surplus tiles are ignored; nothing reads out of bounds.

Every image token is one ordinary RoPE position; attention over the whole sequence is plain causal.
"""

from __future__ import annotations

from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from nvlm_jax.fusion.base import NVLMBase
from nvlm_jax.language.decoder import Cache, CausalLM


def _concrete(*arrays) -> list[np.ndarray] | None:
  """numpy copies when every array is concrete, None under tracing."""
  if any(isinstance(a, jax.core.Tracer) for a in arrays):
    return None
  return [np.asarray(a) for a in arrays]


def _placeholder_errors(
  counts: np.ndarray, valid_tiles: np.ndarray, tokens_per_tile: int, image_token_id: int
) -> list[str]:
  return [
    f"row {b}: {int(c)} image placeholder tokens (id {image_token_id}) but {int(t)} valid tiles x "
    f"{tokens_per_tile} tokens = {int(t) * tokens_per_tile}"
    for b, (c, t) in enumerate(zip(counts, valid_tiles))
    if c != t * tokens_per_tile
  ]


def check_image_placeholders(
  input_ids,
  tile_mask,
  *,
  image_token_id: int,
  tokens_per_tile: int,
  tile_budget: int | None = None,
  under_jit: bool = False,
) -> None:
  """Raises ValueError naming each row whose placeholder count does not match its valid tiles.

  Concrete inputs are checked on the host. Traced inputs are checked only if `under_jit` (a
  `jax.debug.callback` that raises at run time), otherwise skipped.
  """
  counts = jnp.sum(input_ids == image_token_id, axis=1)
  valid_tiles = jnp.sum(tile_mask, axis=1)

  def host_check(counts, valid_tiles):
    counts, valid_tiles = np.asarray(counts), np.asarray(valid_tiles)
    errors = _placeholder_errors(counts, valid_tiles, tokens_per_tile, image_token_id)
    if tile_budget is not None and valid_tiles.sum() > tile_budget:
      errors.append(f"{int(valid_tiles.sum())} valid tiles in the batch exceed tile_budget={tile_budget}")
    if errors:
      raise ValueError("image placeholders do not match the tiles:\n  " + "\n  ".join(errors))

  concrete = _concrete(counts, valid_tiles)
  if concrete is not None:
    host_check(*concrete)
  elif under_jit:
    jax.debug.callback(host_check, counts, valid_tiles)


def merge_image_features(
  token_embeds: jnp.ndarray,
  input_ids: jnp.ndarray,
  image_features: jnp.ndarray,
  tile_mask: jnp.ndarray,
  image_token_id: int,
) -> jnp.ndarray:
  """Puts tile features into the placeholder positions.

  token_embeds [B, L, D], input_ids [B, L], image_features [B, T, N, D], tile_mask [B, T] -> [B, L, D].
  The j-th placeholder of row b receives token j % N of the (j // N)-th valid tile of row b.
  """
  batch, tiles, per_tile, dim = image_features.shape
  chex.assert_shape(token_embeds, (batch, input_ids.shape[1], dim))
  chex.assert_shape(tile_mask, (batch, tiles))
  is_image = input_ids == image_token_id
  ordinal = jnp.cumsum(is_image, axis=1, dtype=jnp.int32) - 1  # j for the j-th placeholder of the row
  tile_ordinal = ordinal // per_tile
  # Slot of the k-th valid tile of each row (valid slots first, order kept).
  valid_slots = jnp.argsort(~tile_mask.astype(bool), axis=1, stable=True).astype(jnp.int32)
  num_valid = jnp.sum(tile_mask, axis=1, dtype=jnp.int32)
  slot = jnp.take_along_axis(valid_slots, jnp.clip(tile_ordinal, 0, tiles - 1), axis=1)
  source = slot * per_tile + ordinal % per_tile  # index into [T * N]
  take = is_image & (tile_ordinal < num_valid[:, None])
  flat = image_features.reshape(batch, tiles * per_tile, dim)
  gathered = jnp.take_along_axis(flat, jnp.where(take, source, 0)[..., None], axis=1)
  return jnp.where(take[..., None], gathered.astype(token_embeds.dtype), token_embeds)


class NVLMD(NVLMBase):
  """InternViT -> pixel shuffle -> MLP projector -> image tokens in the Qwen2/Yi decoder stream.

  Params: `vision_model/` (InternViT), `projector/`, `language_model/` (CausalLM).
  """

  variant: ClassVar[str] = "d"

  def setup(self):
    self.setup_vision()
    self.language_model = CausalLM(self.config.llm)

  def embed_multimodal(
    self,
    input_ids: jnp.ndarray,
    pixel_values: jnp.ndarray | None = None,
    tile_mask: jnp.ndarray | None = None,
    *,
    image_features: jnp.ndarray | None = None,
    tile_budget: int | None = None,
  ) -> jnp.ndarray:
    """Decoder input embeddings [B, L, D]: token embeddings with image features at the placeholders.

    Give either pixel_values (encoded here) or precomputed `image_features` [B, T, N, D] (e.g. from
    `encode_images`), or neither for text only.
    """
    cfg = self.config
    embeds, _, pixel_values, tile_mask = self.embed_inputs(input_ids, pixel_values, tile_mask, image_features)
    if tile_mask is None:
      return embeds
    if not self.is_initializing():
      check_image_placeholders(
        input_ids,
        tile_mask,
        image_token_id=cfg.image_token_id,
        tokens_per_tile=cfg.tokens_per_tile,
        tile_budget=None if image_features is not None else tile_budget,
        under_jit=cfg.debug_checks,
      )
    if image_features is None:
      image_features = self.encode_images(pixel_values, tile_mask, tile_budget=tile_budget)
    return merge_image_features(embeds, input_ids, image_features, tile_mask, cfg.image_token_id)

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
    """logits [B, L, vocab]; with a cache, (logits, updated cache), exactly like CausalLM (logits_to_keep too).

    Prefill with images: pass pixel_values and a fresh cache (`init_cache`); then decode text-only
    steps with input_ids [B, 1] and the returned cache.
    """
    embeds = self.embed_multimodal(
      input_ids, pixel_values, tile_mask, image_features=image_features, tile_budget=tile_budget
    )
    return self.language_model(
      inputs_embeds=embeds, positions=positions, segment_ids=segment_ids, cache=cache, logits_to_keep=logits_to_keep
    )

  def init_cache(self, batch_size: int, max_length: int, dtype: str | None = None) -> Cache:
    """An empty decoder KV cache (works on bound and unbound modules)."""
    return CausalLM(self.config.llm, parent=None).init_cache(batch_size, max_length, dtype)
