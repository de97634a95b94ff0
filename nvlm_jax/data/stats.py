"""What the training pipeline consumed: per-source sample counts, skipped samples by reason, packing fill.

The counts live in the main process, in the packing iterator (packing.py), and are updated from what comes
OUT of the map step: every element carries its ``source`` and, if it was skipped, its ``skip`` reason. So
they are exact whatever the number of grain worker processes, and they are part of the iterator state, so
a run resumed from a checkpoint continues the counts of the run that saved it.

The state is plain JSON (ints and dicts of ints) with a fixed set of keys from the start (every source and
every reason present, at 0), as grain recommends for checkpointable state.

Skipped samples are logged with a rate limit per reason (:class:`RateLimitedLog`): the first few in full,
then only at counts 2^k, so a source full of broken images cannot flood the log.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from nvlm_jax.data.records import BAD_SAMPLE_REASONS

log = logging.getLogger("nvlm_jax.data")

SKIP_REASONS = tuple(sorted(BAD_SAMPLE_REASONS))


class RateLimitedLog:
  """Logs the first ``first_n`` messages per key in full, then one at each count 2^k (with the count)."""

  def __init__(self, logger: logging.Logger = log, first_n: int = 5, level: int = logging.WARNING):
    self.logger, self.first_n, self.level = logger, int(first_n), level
    self.counts: dict[str, int] = {}

  def __call__(self, key: str, message: str) -> bool:
    n = self.counts.get(key, 0) + 1
    self.counts[key] = n
    if n <= self.first_n or (n & (n - 1)) == 0:
      suffix = "" if n <= self.first_n else f" ({n} so far; logging only at powers of 2)"
      self.logger.log(self.level, "%s%s", message, suffix)
      return True
    return False


def empty_stats(source_names: Iterable[str]) -> dict[str, Any]:
  """Counters at zero for these sources (the fixed shape of the state)."""
  return {
    "batches": 0,  # batches emitted
    "rows": 0,  # rows emitted (batches * local batch size)
    "samples": 0,  # samples packed into emitted rows
    "tokens": 0,  # non-padding positions
    "loss_tokens": 0,  # positions with loss_mask 1
    "tiles": 0,  # real tiles (tile_mask True)
    "degraded": 0,  # samples whose tile cap was lowered to fit seq_len / the tile slots
    "skipped": {reason: 0 for reason in SKIP_REASONS},
    "sources": {
      name: {"samples": 0, "degraded": 0, "skipped": {reason: 0 for reason in SKIP_REASONS}} for name in source_names
    },
  }


class DataStats:
  """Mutable counters with a JSON state (see module docstring)."""

  def __init__(self, source_names: Iterable[str], *, logger: RateLimitedLog | None = None):
    self.source_names = list(source_names)
    self.counts = empty_stats(self.source_names)
    self.log_skip = logger or RateLimitedLog()

  def _source(self, name: str) -> dict:
    sources = self.counts["sources"]
    if name not in sources:  # a record whose source the blend did not announce (should not happen)
      sources[name] = {"samples": 0, "degraded": 0, "skipped": {r: 0 for r in SKIP_REASONS}}
    return sources[name]

  def add_skip(self, element: Mapping) -> None:
    reason, source = element["skip"], element.get("source", "?")
    if reason not in self.counts["skipped"]:
      raise ValueError(f"sample {element.get('id')!r}: unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
    self.counts["skipped"][reason] += 1
    self._source(source)["skipped"][reason] += 1
    self.log_skip(
      reason, f"skipped sample {element.get('id')!r} from {source!r}: {reason}: {element.get('detail', '')}"
    )

  def add_sample(self, element: Mapping) -> None:
    entry = self._source(element["source"])
    entry["samples"] += 1
    self.counts["samples"] += 1
    if element.get("degraded"):
      entry["degraded"] += 1
      self.counts["degraded"] += 1

  def add_batch(self, batch: Mapping) -> None:
    seg = batch["segment_ids"]
    self.counts["batches"] += 1
    self.counts["rows"] += int(seg.shape[0])
    self.counts["tokens"] += int((seg != 0).sum())
    self.counts["loss_tokens"] += int(batch["loss_mask"].sum())
    if "tile_mask" in batch:
      self.counts["tiles"] += int(batch["tile_mask"].sum())

  def state(self) -> dict[str, Any]:
    return copy.deepcopy(self.counts)

  def set_state(self, state: Mapping[str, Any]) -> None:
    counts = empty_stats(self.source_names)
    _merge_into(counts, state)
    self.counts = counts


def _merge_into(target: dict, state: Mapping) -> None:
  for key, value in state.items():
    if isinstance(value, Mapping):
      _merge_into(target.setdefault(key, {}), value)
    else:
      target[key] = int(value)


def summarize(stats: Mapping[str, Any], *, seq_len: int | None = None, max_tiles: int | None = None) -> str:
  """One human-readable line: samples per source, skip reasons, packing fill."""
  parts = [f"{stats['samples']} samples in {stats['rows']} rows"]
  by_source = ", ".join(f"{name}={entry['samples']}" for name, entry in stats["sources"].items())
  if by_source:
    parts.append(f"by source: {by_source}")
  skipped = {r: n for r, n in stats["skipped"].items() if n}
  parts.append("skipped: " + (", ".join(f"{r}={n}" for r, n in sorted(skipped.items())) if skipped else "none"))
  if stats["degraded"]:
    parts.append(f"tile-degraded: {stats['degraded']}")
  if seq_len and stats["rows"]:
    parts.append(f"token fill {stats['tokens'] / (stats['rows'] * seq_len):.1%}")
  if max_tiles and stats["rows"]:
    parts.append(f"tile fill {stats['tiles'] / (stats['rows'] * max_tiles):.1%}")
  return "; ".join(parts)
