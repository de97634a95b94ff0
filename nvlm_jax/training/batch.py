"""The training batch: the one contract between the data pipeline and the trainer.

Every training iterator yields a dict of numpy arrays (one process's rows of the global batch)::

    input_ids     int32   [B, L]   token ids (image-token placeholders included for NVLM-D)
    targets       int32   [B, L]   the token to predict AT each position (already shifted by the pipeline)
    loss_mask     float32 [B, L]   1 = this target counts (assistant tokens only), 0 = ignored
    segment_ids   int32   [B, L]   0 = padding, 1..k = the packed samples of the row
    positions     int32   [B, L]   restart at 0 for every packed sample
  multimodal models only:
    pixel_values  float32 [B, T, H, W, 3]   normalized tiles, padded to T = max tiles
    tile_mask     bool    [B, T]            True = a real tile

Models are called as ``model.apply({"params": p}, input_ids, positions=..., segment_ids=...,
pixel_values=..., tile_mask=...)`` and return logits [B, L, V]. The loss (see loss.py) is the per-token
cross entropy summed over loss tokens and divided by the number of loss tokens in the GLOBAL batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import chex
import jax
import numpy as np

TEXT_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
IMAGE_KEYS = ("pixel_values", "tile_mask")
DTYPES = {
  "input_ids": np.int32,
  "targets": np.int32,
  "loss_mask": np.float32,
  "segment_ids": np.int32,
  "positions": np.int32,
  "pixel_values": np.float32,
  "tile_mask": np.bool_,
}

Batch = Mapping[str, Any]


def batch_keys(multimodal: bool) -> tuple[str, ...]:
  return TEXT_KEYS + (IMAGE_KEYS if multimodal else ())


def check_batch(
  batch: Batch,
  *,
  multimodal: bool | None = None,
  batch_size: int | None = None,
  seq_len: int | None = None,
  max_tiles: int | None = None,
  tile_size: int | None = None,
) -> None:
  """Asserts that `batch` follows the contract above (keys, dtypes, shapes); raises with the key at fault.

  multimodal=None infers it from the presence of `pixel_values`. Optional sizes pin the dimensions.
  Works on numpy and jax arrays (host batches or global arrays), not on tracers' values.
  """
  if multimodal is None:
    multimodal = "pixel_values" in batch
  expected = set(batch_keys(multimodal))
  missing, extra = expected - set(batch), set(batch) - expected
  if missing or extra:
    raise ValueError(
      f"training batch keys: missing {sorted(missing)}, unexpected {sorted(extra)}; expected exactly {sorted(expected)}"
    )
  for key in expected:
    if np.dtype(batch[key].dtype) != np.dtype(DTYPES[key]):
      raise TypeError(f"training batch[{key!r}] has dtype {batch[key].dtype}, expected {np.dtype(DTYPES[key])}")
  b = batch["input_ids"].shape[0] if batch_size is None else batch_size
  l = batch["input_ids"].shape[-1] if seq_len is None else seq_len
  try:
    chex.assert_shape([batch[k] for k in TEXT_KEYS], (b, l))
    if multimodal:
      t = batch["tile_mask"].shape[-1] if max_tiles is None else max_tiles
      chex.assert_shape(batch["tile_mask"], (b, t))
      hw = (tile_size, tile_size) if tile_size is not None else (None, None)
      chex.assert_shape(batch["pixel_values"], (b, t, *hw, 3))
  except AssertionError as e:
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    raise ValueError(f"training batch shapes {shapes} break the contract (B={b}, L={l}): {e}") from None


def check_batch_values(batch: Batch) -> None:
  """Host-side value checks that are too slow for every step but catch pipeline bugs in tests.

  positions restart at 0 in every segment, padding has no loss, the loss mask is 0/1.
  """
  seg = np.asarray(batch["segment_ids"])
  pos = np.asarray(batch["positions"])
  mask = np.asarray(batch["loss_mask"])
  if np.any(mask[seg == 0] != 0):
    raise ValueError("training batch: loss_mask is non-zero on padding (segment_ids == 0)")
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError("training batch: loss_mask must be 0 or 1")
  starts = np.ones_like(seg, dtype=bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  real = seg != 0
  if np.any(pos[starts & real] != 0):
    rows = np.flatnonzero(np.any(starts & real & (pos != 0), axis=1)).tolist()
    raise ValueError(f"training batch: positions do not restart at 0 at a segment start (rows {rows})")


def abstract_batch(
  batch_size: int, seq_len: int, *, multimodal: bool, max_tiles: int = 0, tile_size: int = 448, sharding: Any = None
) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of one GLOBAL batch (for lowering without data, e.g. the planner)."""
  shapes = {k: (batch_size, seq_len) for k in TEXT_KEYS}
  if multimodal:
    shapes["pixel_values"] = (batch_size, max_tiles, tile_size, tile_size, 3)
    shapes["tile_mask"] = (batch_size, max_tiles)
  out = {}
  for key, shape in shapes.items():
    s = sharding[key] if isinstance(sharding, Mapping) else sharding
    out[key] = jax.ShapeDtypeStruct(shape, DTYPES[key], sharding=s)
  return out


def model_inputs(batch: Batch) -> tuple[Any, dict[str, Any]]:
  """(input_ids, keyword arguments) for `model.apply`: positions, segment_ids and any image arrays."""
  kwargs = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
  for key in IMAGE_KEYS:
    if key in batch:
      kwargs[key] = batch[key]
  return batch["input_ids"], kwargs
