"""One record -> one training example (or a skip marker): the pipeline's map step.

    validate  -> decode images -> tile + tokenize (Processor) -> shift -> {input_ids, targets, loss_mask, pixels}

Everything that can be wrong with a single sample is decided here and turned into a *skip marker*
``{"id", "source", "skip": reason, "detail"}`` instead of an exception, so that:

* the map step stays one-element-in, one-element-out: grain's index -> element mapping, the worker
  interleaving (output order does not depend on the number of workers) and resume all stay exact;
* the main process counts skips by reason and by source (stats.py) from what comes out of the map.

Over-long samples: the tile cap per image is lowered along the authors' degradation map
(``{12: 8, 8: 6, 6: 4, 4: 2, 2: 1, 1: 1}``, Megatron ``dataset_helpers.py``; a cap not in the map steps to
the next lower key, e.g. 5 -> 4) until the sample fits ``seq_len`` tokens and ``max_tiles`` tile slots;
if it still does not fit at 1 tile per image it is skipped as ``too_long``. Text is never truncated, so no
answer token is ever cut silently.

Targets: the Processor labels assistant content + its ``<|im_end|>`` (chat_template.py). For a sample of
``n`` tokens the example holds ``n - 1`` positions: ``input_ids = ids[:-1]``, ``targets = ids[1:]``,
``loss_mask = labels[1:] != IGNORE_INDEX`` (Megatron's tokens/labels split), so every position has a
real next token and the last token (the trailing newline) is never an input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from nvlm_jax.data import records
from nvlm_jax.data.records import BadSampleError, bad_sample_from_image_error, validate_record
from nvlm_jax.processing.processor import (
  IGNORE_INDEX,
  ImageCountMismatchError,
  Processor,
  SampleTooLongError,
)
from nvlm_jax.vision.image_io import ImageError, load_image

# Megatron's tile-degradation map (docs/paper.md (g)): tiles per image -> fewer tiles when a sample overflows.
TILE_DEGRADATION = {12: 8, 8: 6, 6: 4, 4: 2, 2: 1, 1: 1}


def parse_degradation(value: Any) -> dict[int, int]:
  """``{12: 8, ...}``, ``{"12": 8}`` or ``"12:8,8:6,..."`` -> ``{int: int}`` (each value <= its key)."""
  if value is None or value == "":
    return dict(TILE_DEGRADATION)
  if isinstance(value, str):
    pairs = [p.split(":") for p in value.replace(" ", "").split(",") if p]
    value = {a: b for a, b in pairs}
  out = {int(k): int(v) for k, v in dict(value).items()}
  bad = {k: v for k, v in out.items() if not 1 <= v <= k}
  if bad or not out:
    raise ValueError(f"tile degradation map {out} must map each tile count k >= 1 to 1 <= v <= k; bad: {bad}")
  return out


def next_tile_cap(cap: int, degradation: Mapping[int, int] = TILE_DEGRADATION) -> int:
  """The next smaller per-image tile cap (``cap`` itself when it cannot go lower)."""
  if cap in degradation:
    return int(degradation[cap])
  lower = [k for k in degradation if k < cap]
  return max(lower) if lower else cap


def degradation_steps(start: int, degradation: Mapping[int, int] = TILE_DEGRADATION) -> list[int]:
  """Caps tried for a sample, e.g. 6 -> [6, 4, 2, 1]."""
  caps = [int(start)]
  while (nxt := next_tile_cap(caps[-1], degradation)) < caps[-1]:
    caps.append(nxt)
  return caps


def skip_marker(record: Mapping | Any, reason: str, detail: str) -> dict[str, Any]:
  record = record if isinstance(record, Mapping) else {}
  return {
    "id": str(record.get("id", "<no id>")),
    "source": str(record.get("source", "?")),
    "skip": reason,
    "detail": detail,
  }


class EncodeRecord:
  """The map transform (module-level class, so it pickles into grain worker processes).

  Returns an example::

      {"id", "source", "skip": "",
       "input_ids" int32 [n], "targets" int32 [n], "loss_mask" float32 [n],
       "pixel_values" float32 [t, S, S, 3], "grids" [(cols, rows, has_thumbnail), ...],
       "tile_cap": final tiles-per-image cap, "degraded": bool}

  or a skip marker ``{"id", "source", "skip": reason, "detail"}`` (reasons: records.BAD_SAMPLE_REASONS).
  ``max_tiles=0`` makes a text-only pipeline: samples with images are skipped as ``too_long``.
  """

  def __init__(
    self,
    processor: Processor,
    *,
    seq_len: int,
    max_tiles: int,
    degradation: Mapping[int, int] | str | None = None,
    max_text_chars: int | None = None,
    max_images: int | None = None,
    keep_text: bool = False,
  ):
    if seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    self.processor = processor
    self.seq_len, self.max_tiles = int(seq_len), int(max_tiles)
    self.degradation = parse_degradation(degradation)
    self.max_text_chars, self.max_images = max_text_chars, max_images
    self.keep_text = keep_text  # also return the rendered prompt (the inspect CLI)

  def __call__(self, record: Mapping) -> dict[str, Any]:
    try:
      validate_record(record, check_images=False, max_text_chars=self.max_text_chars, max_images=self.max_images)
    except BadSampleError as e:
      return skip_marker(record, e.reason, e.detail)

    images = []
    for k, image in enumerate(record["images"]):
      try:
        images.append(load_image(image, max_pixels=self.processor.max_image_pixels))
      except ImageError as e:
        err = bad_sample_from_image_error(record["id"], e, index=k)
        return skip_marker(record, err.reason, err.detail)
    return self.encode(record, images)

  def encode(self, record: Mapping, images: list) -> dict[str, Any]:
    """Tile + tokenize with decreasing tile caps until the sample fits (images already decoded)."""
    requested = self.processor.max_tiles_per_image
    caps = degradation_steps(requested, self.degradation) if images else [requested]
    if images and self.max_tiles < 1:
      return skip_marker(
        record,
        records.TOO_LONG,
        f"{len(images)} image(s) but the pipeline has no tile slots (max_tiles=0, a text-only pipeline)",
      )
    overflow = ""
    for cap in caps:
      try:
        sample = self.processor.encode_sample(
          record["messages"], images, max_length=self.seq_len + 1, max_tiles_per_image=cap
        )
      except SampleTooLongError as e:
        overflow = f"tile cap {cap}: {e}"
        continue
      except ImageCountMismatchError as e:
        return skip_marker(record, records.IMAGE_COUNT_MISMATCH, str(e))
      except ValueError as e:  # the processor refused the conversation (e.g. a placeholder token as text)
        return skip_marker(record, records.MALFORMED_CONVERSATION, str(e))
      if sample.num_tiles > self.max_tiles:
        overflow = f"tile cap {cap}: {sample.num_tiles} tiles > {self.max_tiles} tile slots per row"
        continue
      return self._example(record, sample, cap, degraded=cap < requested)
    return skip_marker(
      record,
      records.TOO_LONG,
      f"does not fit seq_len={self.seq_len} (+1 for the shift) / max_tiles={self.max_tiles} "
      f"even after tile degradation {caps}: {overflow}",
    )

  def _example(self, record: Mapping, sample, cap: int, *, degraded: bool) -> dict[str, Any]:
    ids, labels = sample.input_ids, sample.labels
    loss_mask = (labels[1:] != IGNORE_INDEX).astype(np.float32)
    if not loss_mask.any():
      return skip_marker(record, records.EMPTY_CONVERSATION, "no assistant token to train on")
    example = {
      "id": str(record["id"]),
      "source": str(record["source"]),
      "skip": "",
      "input_ids": np.ascontiguousarray(ids[:-1], dtype=np.int32),
      "targets": np.ascontiguousarray(ids[1:], dtype=np.int32),
      "loss_mask": loss_mask,
      "pixel_values": np.ascontiguousarray(sample.pixel_values, dtype=np.float32),
      "grids": [(g.cols, g.rows, g.has_thumbnail) for g in sample.grids],
      "tile_cap": int(cap),
      "degraded": bool(degraded),
    }
    if self.keep_text:
      example["text"] = sample.text
    return example
