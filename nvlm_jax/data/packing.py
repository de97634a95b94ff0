"""Packing examples into fixed-shape rows and rows into batches, as a checkpointable grain iterator.

A batch is ``batch_size`` rows of ``seq_len`` tokens and ``max_tiles`` tile slots (nvlm_jax/training/batch.py).
Examples are placed **first-fit** into the rows of the batch being built: an example goes into the first row
where its tokens fit the remaining ``seq_len`` and its tiles the remaining tile slots (and, with a
``tile_budget``, the batch's remaining tile budget). When an example fits no row, the batch is emitted and
that example starts the next batch. Each row is therefore never empty unless a tile budget blocks it.

Packing modes (``pack``):

* ``"all"`` (default): any examples share a row while tokens and tile slots allow. Text-only examples fill
  the space multimodal ones leave (at the paper setting a 6+1-tile sample uses ~1,900 of 3,200 tokens and
  all 7 slots, so text-only samples join it); two image samples share a row only if their tiles fit the
  slots. This is safe for NVLM-D: the model fills the k-th run of image placeholders of a row with the
  row's k-th valid tile (fusion/nvlm_d.py), and tiles are laid out in sample order here.
* ``"text_only"``: only text-only examples share rows; an example with images gets a row of its own.
* ``"none"``: one example per row.

In a row, example k (1-based) has ``segment_ids == k`` and ``positions`` restarting at 0; padding has
segment 0, position 0, ``input_ids = targets = pad_id`` and no loss. Targets were shifted per example
(encode.py), so no target crosses from one packed sample into the next.

Checkpointing: the state is taken only between batches. It is ``consumed``, the number of map-step
elements read *before* the example that was left over for the next batch (so restoring re-reads it), plus
the counters (stats.py), which count an example only once it is placed and a skipped one when it is read;
a restored iterator therefore yields exactly the batches, and reports exactly the counts, of an
uninterrupted one. Because the map step is one element in, one element out (skips are markers, never
dropped) and grain's worker interleave is round-robin, ``consumed`` fully determines the parent's position
for ANY number of workers: :func:`parent_state` rebuilds grain's own state from it, so a run saved with
``worker_count=0`` can resume with 2 workers and vice versa.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from nvlm_jax.data.stats import DataStats

PACK_MODES = ("all", "text_only", "none")


def parent_state(consumed: int, worker_count: int) -> dict[str, Any]:
  """grain's iterator state after ``consumed`` elements of a 1:1 ``MapDataset`` read in order.

  ``worker_count=0``: the in-process reader (``{"next_index": n}``). ``W >= 1``: ``mp_prefetch``'s
  round-robin interleave of W workers, worker i reading elements i, i + W, ... (grain 0.2.x state layout).
  """
  consumed = int(consumed)
  if worker_count <= 0:
    return {"next_index": consumed}
  w = int(worker_count)
  return {
    "next_index_in_cycle": consumed % w,
    "next_index_in_datasets": w,
    "iterators_in_use_indices": list(range(w)),
    "iterators_in_use_states": [{"next_index": max(0, (consumed - i + w - 1) // w)} for i in range(w)],
    "exhausted": [0] * w,
    "future_states": {},
  }


class _Row:
  __slots__ = ("examples", "tokens", "tiles", "closed")

  def __init__(self):
    self.examples: list[dict] = []
    self.tokens = 0
    self.tiles = 0
    self.closed = False  # nothing else may join (pack="none", or an image sample under "text_only")


class PackedBatchIterDataset(grain.IterDataset):
  """``IterDataset`` of batches (dicts of numpy arrays, the training-batch contract) from examples."""

  def __init__(
    self,
    parent: grain.IterDataset,
    *,
    batch_size: int,
    seq_len: int,
    max_tiles: int,
    tile_size: int,
    pad_id: int,
    source_names: Sequence[str],
    pack: str = "all",
    tile_budget: int = 0,
    drop_remainder: bool = False,
    include_sample_ids: bool = False,
    worker_count: int = 0,
    max_consecutive_skips: int = 10_000,
  ):
    """``worker_count``: the parent's ``mp_prefetch`` workers (0 = none), for :func:`parent_state`."""
    super().__init__(parent)
    if pack not in PACK_MODES:
      raise ValueError(f"pack={pack!r}; expected one of {PACK_MODES}")
    if batch_size < 1 or seq_len < 1 or max_tiles < 0:
      raise ValueError(f"need batch_size >= 1, seq_len >= 1, max_tiles >= 0; got {batch_size}, {seq_len}, {max_tiles}")
    if tile_budget and tile_budget < max_tiles:
      raise ValueError(
        f"tile_budget={tile_budget} per batch is below max_tiles={max_tiles}: a sample "
        "with max_tiles tiles could never be placed"
      )
    self.options = dict(
      batch_size=int(batch_size),
      seq_len=int(seq_len),
      max_tiles=int(max_tiles),
      tile_size=int(tile_size),
      pad_id=int(pad_id),
      source_names=list(source_names),
      pack=pack,
      tile_budget=int(tile_budget or 0),
      drop_remainder=bool(drop_remainder),
      include_sample_ids=bool(include_sample_ids),
      worker_count=int(worker_count),
      max_consecutive_skips=int(max_consecutive_skips),
    )

  def __iter__(self) -> "PackedBatchIterator":
    return PackedBatchIterator(self._parent.__iter__(), **self.options)

  def __str__(self) -> str:
    o = self.options
    return (
      f"PackedBatchIterDataset(batch_size={o['batch_size']}, seq_len={o['seq_len']}, "
      f"max_tiles={o['max_tiles']}, pack={o['pack']!r})"
    )


class PackedBatchIterator(grain.DatasetIterator):
  """See the module docstring. ``stats()`` returns the counters as of the last emitted batch."""

  def __init__(
    self,
    parent: grain.DatasetIterator,
    *,
    batch_size: int,
    seq_len: int,
    max_tiles: int,
    tile_size: int,
    pad_id: int,
    source_names: Sequence[str],
    pack: str = "all",
    tile_budget: int = 0,
    drop_remainder: bool = False,
    include_sample_ids: bool = False,
    worker_count: int = 0,
    max_consecutive_skips: int = 10_000,
  ):
    super().__init__(parent)
    self.worker_count = worker_count
    # A run this long of skipped samples means the data or the limits are wrong: fail instead of spinning.
    self.max_consecutive_skips = max_consecutive_skips
    self.batch_size, self.seq_len, self.max_tiles, self.tile_size = batch_size, seq_len, max_tiles, tile_size
    self.pad_id, self.pack, self.tile_budget = pad_id, pack, tile_budget
    self.drop_remainder, self.include_sample_ids = drop_remainder, include_sample_ids
    self.counters = DataStats(source_names)
    self._carry: dict | None = None  # the example that did not fit the last batch
    self._consumed = 0  # parent elements read so far (the carry included)
    self._exhausted = False

  # ---- checkpointing -----------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    consumed = self._consumed - (self._carry is not None)
    return {"consumed": consumed, "stats": self.counters.state()}

  def set_state(self, state: dict[str, Any]) -> None:
    consumed = int(state["consumed"])
    self._parent.set_state(parent_state(consumed, self.worker_count))
    self.counters.set_state(state["stats"])
    self._carry, self._consumed, self._exhausted = None, consumed, False

  def stats(self) -> dict[str, Any]:
    return self.counters.state()

  # ---- packing -----------------------------------------------------------------------------------
  def _fits(self, row: _Row, example: dict, batch_tiles: int) -> bool:
    n, t = len(example["input_ids"]), example["pixel_values"].shape[0]
    if row.closed or row.tokens + n > self.seq_len or row.tiles + t > self.max_tiles:
      return False
    if self.tile_budget and batch_tiles + t > self.tile_budget:
      return False
    if row.examples and self.pack == "text_only" and t > 0:
      return False
    return True

  def _place(self, rows: list[_Row], example: dict, batch_tiles: int) -> int:
    """Tiles added (>= 0) or -1 when the example fits no row."""
    for row in rows:
      if self._fits(row, example, batch_tiles):
        t = example["pixel_values"].shape[0]
        row.examples.append(example)
        row.tokens += len(example["input_ids"])
        row.tiles += t
        row.closed = self.pack == "none" or (self.pack == "text_only" and t > 0)
        self.counters.add_sample(example)
        return t
    return -1

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._exhausted:
      raise StopIteration
    rows = [_Row() for _ in range(self.batch_size)]
    batch_tiles = skipped_in_a_row = 0
    if self._carry is not None:
      carry, self._carry = self._carry, None
      added = self._place(rows, carry, batch_tiles)
      if added < 0:  # cannot happen for an example the encoder accepted
        raise RuntimeError(
          f"sample {carry['id']!r} does not fit an empty row (seq_len={self.seq_len}, max_tiles={self.max_tiles})"
        )
      batch_tiles += added
    while True:
      try:
        example = next(self._parent)
      except StopIteration:
        self._exhausted = True
        if not any(row.examples for row in rows) or self.drop_remainder:
          raise
        break
      self._consumed += 1
      if example["skip"]:
        self.counters.add_skip(example)
        skipped_in_a_row += 1
        if skipped_in_a_row >= self.max_consecutive_skips:
          raise RuntimeError(
            f"{skipped_in_a_row} samples in a row were skipped (last: {example['id']!r}, "
            f"{example['skip']!r}); counts so far: {self.counters.state()['skipped']}. "
            f"The data or the limits (seq_len={self.seq_len}, max_tiles={self.max_tiles}) are wrong."
          )
        continue
      skipped_in_a_row = 0
      added = self._place(rows, example, batch_tiles)
      if added < 0:
        self._carry = example
        break
      batch_tiles += added
    batch = self._assemble(rows)
    self.counters.add_batch(batch)
    return batch

  def _assemble(self, rows: list[_Row]) -> dict[str, Any]:
    b, length, slots, size = self.batch_size, self.seq_len, self.max_tiles, self.tile_size
    out = {
      "input_ids": np.full((b, length), self.pad_id, np.int32),
      "targets": np.full((b, length), self.pad_id, np.int32),
      "loss_mask": np.zeros((b, length), np.float32),
      "segment_ids": np.zeros((b, length), np.int32),
      "positions": np.zeros((b, length), np.int32),
    }
    if slots:
      out["pixel_values"] = np.zeros((b, slots, size, size, 3), np.float32)
      out["tile_mask"] = np.zeros((b, slots), bool)
    for r, row in enumerate(rows):
      offset = tile_offset = 0
      for k, example in enumerate(row.examples, start=1):
        n = len(example["input_ids"])
        span = slice(offset, offset + n)
        out["input_ids"][r, span] = example["input_ids"]
        out["targets"][r, span] = example["targets"]
        out["loss_mask"][r, span] = example["loss_mask"]
        out["segment_ids"][r, span] = k
        out["positions"][r, span] = np.arange(n, dtype=np.int32)
        offset += n
        t = example["pixel_values"].shape[0]
        if t:
          out["pixel_values"][r, tile_offset : tile_offset + t] = example["pixel_values"]
          out["tile_mask"][r, tile_offset : tile_offset + t] = True
          tile_offset += t
    if self.include_sample_ids:  # debugging / tests only: not part of the training-batch contract
      out["sample_ids"] = [[example["id"] for example in row.examples] for row in rows]
    return out
