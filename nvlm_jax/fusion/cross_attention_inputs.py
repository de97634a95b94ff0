"""Where the tiles are in an NVLM-X/H token stream, and the cross-attention key/value stream and masks.

Everything is read from `input_ids` (+ `segment_ids`, `tile_mask`), so X and H keep the model-call protocol
of the rest of the package: the training batch and `nvlm_jax.generate` pass only ids, pixels and a tile mask
(no per-token side arrays, which left-alignment and packing would also have to move).

The processor writes each tile as `tag` + a placeholder group (see nvlm_jax/processing/processor.py):

    X:  <Image> <tile_1> P <tile_2> P ... <tile_global_thumbnail> P </Image>          (P: one placeholder)
    H:  <Image> <tile_1> P ... <tile_6> P <tile_global_thumbnail> P*tokens_per_tile </Image>

Groups: X: every placeholder is one tile's group (so tag-less X still works); H: every maximal run of
placeholders is one group (H needs tags to separate them). The j-th group of a row belongs to the j-th
valid tile of the row (NVLM-D's rule), its first placeholder is the tile's *anchor*. A group of exactly
one placeholder sends its tile to cross-attention; a longer one (H's thumbnail) puts the tile's image
tokens in the decoder, as NVLM-D does.

Tag tokens of tile j: the tokens between the previous boundary and its anchor, at most `max_tag_tokens`,
where a boundary is the end of a placeholder group, the start of a segment, or the end of the image-start
text `<Image>` (config.image_start_token_ids: `<Image>` as the processor tokenizes it, on its own).

Key/value stream, per tile slot t (static: T slots x (E + N) keys, E = max_tag_tokens, N = tokens_per_tile):

    [embeddings of tile t's tag tokens, padded to E] + [tile t's N projected image tokens]

valid only for cross-attention tiles. Masks (token i of segment s, tile t of the same segment):
  - i inside tile t's tag        -> sees tile t only;
  - i inside any other tile's tag -> does not see t;
  - any other token              -> sees t iff t's anchor is at or before i (images that came before it).
Keys of other segments, padded tiles and padded tag slots are never visible; a row that sees nothing gets
a zero cross-attention output (gated_cross_attention.py). `visible` marks what tokens after the call (the
decode steps) may see: every valid key of the row's last segment.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from nvlm_jax.fusion.nvlm_d import _concrete


class TileLayout(NamedTuple):
  """Per position [B, L] and per tile rank [B, T] (rank j = the row's j-th valid tile / placeholder group)."""

  is_placeholder: jnp.ndarray  # [B, L] bool
  group_of: jnp.ndarray  # [B, L] int32: rank of the group holding this placeholder, -1 elsewhere
  tag_of: jnp.ndarray  # [B, L] int32: rank of the tile whose tag holds this token, -1 elsewhere
  anchor: jnp.ndarray  # [B, T] int32: first placeholder of group j (L if the row has no group j)
  run_length: jnp.ndarray  # [B, T] int32: placeholders in group j
  tag_start: jnp.ndarray  # [B, T] int32: first tag token of group j
  tag_length: jnp.ndarray  # [B, T] int32
  tag_truncated: jnp.ndarray  # [B, T] bool: the tag ran past max_tag_tokens (only the last E tokens count)
  num_groups: jnp.ndarray  # [B] int32


def _shift_right(a: jnp.ndarray, fill, steps: int = 1) -> jnp.ndarray:
  """a[:, i - steps] at position i (fill for i < steps)."""
  if steps >= a.shape[1]:
    return jnp.full(a.shape, fill, a.dtype)
  return jnp.concatenate([jnp.full((a.shape[0], steps), fill, a.dtype), a[:, : a.shape[1] - steps]], axis=1)


def pattern_ends(input_ids: jnp.ndarray, pattern: Sequence[int]) -> jnp.ndarray:
  """[B, L] bool: the token sequence `pattern` ends at this position."""
  ends = jnp.ones(input_ids.shape, bool) if pattern else jnp.zeros(input_ids.shape, bool)
  for t, token in enumerate(pattern):
    ends &= _shift_right(input_ids, -1, len(pattern) - 1 - t) == token
  return ends


def tile_layout(
  input_ids: jnp.ndarray,
  segment_ids: jnp.ndarray | None,
  *,
  image_token_id: int,
  max_tiles: int,
  one_tile_per_placeholder: bool,
  image_start_token_ids: Sequence[int] = (),
  max_tag_tokens: int = 8,
) -> TileLayout:
  """Finds every tile's placeholder group and tag in the stream (module docstring). Static shapes."""
  chex.assert_rank(input_ids, 2)
  batch, length = input_ids.shape
  tiles = max_tiles
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  idx = jnp.arange(length, dtype=jnp.int32)
  rows = jnp.arange(batch)[:, None]
  is_ph = input_ids == image_token_id
  seg_start = segment_ids != _shift_right(segment_ids, -1)
  after_ph = _shift_right(is_ph, False)
  start = is_ph if one_tile_per_placeholder else is_ph & (~after_ph | seg_start)
  ordinal = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1
  group_of = jnp.where(is_ph, ordinal, -1)
  num_groups = jnp.sum(start, axis=1, dtype=jnp.int32)
  # Per-group values; positions that are not group starts (or groups past the T slots) go to column T.
  column = jnp.where(start & (ordinal < tiles), ordinal, tiles)
  anchor = (
    jnp.full((batch, tiles + 1), length, jnp.int32)
    .at[rows, column]
    .min(jnp.broadcast_to(idx, (batch, length)))[:, :tiles]
  )
  run_column = jnp.where(is_ph & (ordinal < tiles), ordinal, tiles)
  run_length = jnp.zeros((batch, tiles + 1), jnp.int32).at[rows, run_column].add(1)[:, :tiles]
  # Tags: the tokens after the last boundary before the anchor, at most max_tag_tokens of them.
  boundary = seg_start | after_ph | _shift_right(pattern_ends(input_ids, tuple(image_start_token_ids)), False)
  last_boundary = jax.lax.cummax(jnp.where(boundary, idx, 0), axis=1)
  exists = anchor < length
  anchor_clip = jnp.minimum(anchor, length - 1)
  bound = jnp.take_along_axis(last_boundary, anchor_clip, axis=1)
  tag_start = jnp.where(exists, jnp.maximum(bound, anchor - max_tag_tokens), anchor)
  tag_length = jnp.where(exists, anchor - tag_start, 0)
  tag_truncated = exists & (anchor - max_tag_tokens > bound)
  # Each token's next placeholder; the token is a tag token if it lies in that group's tag span.
  next_ph = jax.lax.cummin(jnp.where(is_ph, idx, length), axis=1, reverse=True)
  next_clip = jnp.minimum(next_ph, length - 1)
  next_bound = jnp.take_along_axis(last_boundary, next_clip, axis=1)
  in_tag = (
    ~is_ph
    & (next_ph < length)
    & (idx >= jnp.maximum(next_bound, next_ph - max_tag_tokens))
    & jnp.take_along_axis(start, next_clip, axis=1)
  )
  tag_of = jnp.where(in_tag, jnp.take_along_axis(ordinal, next_clip, axis=1), -1)
  return TileLayout(is_ph, group_of, tag_of, anchor, run_length, tag_start, tag_length, tag_truncated, num_groups)


def tile_ranks(tile_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(rank [B, T] of each slot among the row's valid tiles, slot [B, T] of the rank-j valid tile)."""
  tile_mask = tile_mask.astype(bool)
  rank = jnp.cumsum(tile_mask, axis=1, dtype=jnp.int32) - 1
  slot_of_rank = jnp.argsort(~tile_mask, axis=1, stable=True).astype(jnp.int32)
  return rank, slot_of_rank


def cross_attention_inputs(
  layout: TileLayout,
  token_embeds: jnp.ndarray,
  image_features: jnp.ndarray,
  tile_mask: jnp.ndarray,
  segment_ids: jnp.ndarray | None,
  *,
  cross_groups: jnp.ndarray,
  max_tag_tokens: int,
) -> dict[str, jnp.ndarray]:
  """The key/value stream and masks (module docstring).

  token_embeds [B, L, D] (tag embeddings are read from it), image_features [B, T, N, D], tile_mask [B, T],
  cross_groups [B, T] bool per rank: the group sends its tile to cross-attention.
  Returns memory [B, S, D], mask [B, 1, L, S], has_keys [B, L], visible [B, S] with S = T * (E + N).
  """
  batch, tiles, per_tile, dim = image_features.shape
  length = token_embeds.shape[1]
  chex.assert_shape(token_embeds, (batch, length, dim))
  chex.assert_shape(tile_mask, (batch, tiles))
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  e = max_tag_tokens
  rank, _ = tile_ranks(tile_mask)
  real = tile_mask.astype(bool) & (rank < layout.num_groups[:, None])
  r = jnp.clip(rank, 0, tiles - 1)
  by_slot = lambda per_rank: jnp.take_along_axis(per_rank, r, axis=1)
  anchor, tag_start, tag_length = by_slot(layout.anchor), by_slot(layout.tag_start), by_slot(layout.tag_length)
  cross_tile = real & by_slot(cross_groups)
  # Keys/values: [tag embeddings (E slots)] + [image tokens (N)] per tile.
  slots = jnp.arange(e, dtype=jnp.int32)
  tag_pos = jnp.clip(tag_start[..., None] + slots, 0, length - 1).reshape(batch, tiles * e)
  tag_embeds = jnp.take_along_axis(token_embeds, tag_pos[..., None], axis=1).reshape(batch, tiles, e, dim)
  tag_ok = (slots < tag_length[..., None]) & cross_tile[..., None]
  key_ok = jnp.concatenate([tag_ok, jnp.broadcast_to(cross_tile[..., None], (batch, tiles, per_tile))], axis=2)
  memory = jnp.concatenate([tag_embeds, image_features.astype(token_embeds.dtype)], axis=2)
  memory = jnp.where(key_ok[..., None], memory, jnp.zeros((), memory.dtype))
  keys = tiles * (e + per_tile)
  memory = memory.reshape(batch, keys, dim)
  # Which tiles each token sees.
  tile_segment = jnp.where(real, jnp.take_along_axis(segment_ids, jnp.clip(anchor, 0, length - 1), axis=1), 0)
  query = jnp.arange(length, dtype=jnp.int32)[None, :, None]
  tag_of = layout.tag_of[:, :, None]
  sees = jnp.where(tag_of >= 0, tag_of == rank[:, None, :], query >= anchor[:, None, :])
  sees &= (segment_ids[:, :, None] == tile_segment[:, None, :]) & (segment_ids[:, :, None] != 0)
  sees &= cross_tile[:, None, :]
  mask = (sees[..., None] & key_ok[:, None]).reshape(batch, length, keys)
  last_segment = jnp.max(segment_ids, axis=1)
  later = (tile_segment == last_segment[:, None]) & (last_segment[:, None] > 0)
  visible = (key_ok & later[..., None]).reshape(batch, keys)
  return {"memory": memory, "mask": mask[:, None], "has_keys": jnp.any(mask, axis=-1), "visible": visible}


def _layout_errors(
  num_groups,
  valid_tiles,
  run_length,
  truncated,
  *,
  max_tiles: int,
  tokens_per_tile: int | None,
  check_truncation: bool,
  image_token_id: int,
  max_tag_tokens: int,
) -> list[str]:
  errors = []
  for b in range(len(num_groups)):
    groups, tiles = int(num_groups[b]), int(valid_tiles[b])
    if groups != tiles:
      errors.append(f"row {b}: {groups} tile placeholder groups (id {image_token_id}) but {tiles} valid tiles")
    n = min(groups, max_tiles)
    if tokens_per_tile is not None:
      bad = [int(x) for x in run_length[b, :n] if x not in (1, tokens_per_tile)]
      if bad:
        errors.append(
          f"row {b}: placeholder runs of length {bad}; NVLM-H expects 1 (cross-attention tile) or "
          f"{tokens_per_tile} (thumbnail)"
        )
    if check_truncation and np.any(truncated[b, :n]):
      errors.append(
        f"row {b}: tile tag(s) {np.flatnonzero(truncated[b, :n]).tolist()} longer than max_tag_tokens={max_tag_tokens}"
      )
  return errors


def check_tile_layout(
  layout: TileLayout,
  tile_mask: jnp.ndarray,
  *,
  image_token_id: int,
  max_tiles: int,
  tokens_per_tile: int | None = None,
  check_truncation: bool = False,
  max_tag_tokens: int = 8,
  under_jit: bool = False,
) -> None:
  """Raises ValueError naming each row whose placeholder groups do not match its valid tiles.

  tokens_per_tile: also check run lengths (NVLM-H). check_truncation: tags must fit max_tag_tokens (only
  meaningful when the image-start ids are known). Concrete inputs are checked on the host; traced ones
  only with `under_jit` (a host callback).
  """
  valid_tiles = jnp.sum(tile_mask, axis=1)
  args = (layout.num_groups, valid_tiles, layout.run_length, layout.tag_truncated)
  kwargs = dict(
    max_tiles=max_tiles,
    tokens_per_tile=tokens_per_tile,
    check_truncation=check_truncation,
    image_token_id=image_token_id,
    max_tag_tokens=max_tag_tokens,
  )

  def host_check(*arrays):
    errors = _layout_errors(*[np.asarray(a) for a in arrays], **kwargs)
    if errors:
      raise ValueError("image placeholders do not match the tiles:\n  " + "\n  ".join(errors))

  concrete = _concrete(*args)
  if concrete is not None:
    host_check(*concrete)
  elif under_jit:
    jax.debug.callback(host_check, *args)
