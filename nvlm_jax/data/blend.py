"""A weighted mixture of random-access sources, itself a random-access source (a ``grain.MapDataset.source``).

Element k of the blend is drawn from source j with probability ``weights[j]`` (normalised), independently per
element but deterministically from ``seed``: the blend is cut into blocks of ``block_size`` elements; the
per-block source counts are one multinomial draw per block (all drawn at construction, so the running
count of every source at every block start is a small table), and the order inside block b is a permutation
seeded by ``(seed, b)``. Random access therefore costs one block permutation (cached), never a scan.

Within a source, elements are taken in order, ``0, 1, 2, ...`` and wrap around when the source is exhausted
(so a small, heavily weighted source is repeated, i.e. upsampled). Shuffling is left to the pipeline.

Each returned record's ``source`` field is overwritten with the blend component's name, so the pipeline can
count what it actually consumed; ``source_counts(n)`` gives the exact per-source counts of the first n
elements for logging. Text-only sources are ordinary components.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from nvlm_jax.data.records import Record


class BlendedSource:
  """``sources[j]`` drawn with probability ``weights[j]``; random access, deterministic per ``seed``."""

  def __init__(
    self,
    sources: Sequence,
    weights: Sequence[float],
    *,
    seed: int = 0,
    num_samples: int | None = None,
    names: Sequence[str] | None = None,
    block_size: int = 1024,
  ):
    """``num_samples`` defaults to the total length of the sources (one pass worth of elements)."""
    if not sources or len(sources) != len(weights):
      raise ValueError(f"need one weight per source, got {len(sources)} sources and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    self.sources = list(sources)
    self.lengths = [len(s) for s in self.sources]
    if names is None:
      names = [getattr(s, "name", None) or f"source_{j}" for j, s in enumerate(self.sources)]
    self.names = [str(n) for n in names]
    if len(self.names) != len(self.sources) or len(set(self.names)) != len(self.names):
      raise ValueError(f"blend component names must be unique, one per source, got {self.names}; pass names=")
    for j, (n, length) in enumerate(zip(self.names, self.lengths)):
      if w[j] > 0 and length == 0:
        raise ValueError(f"blend component {n!r} has weight {w[j]} but is empty")
    self.weights = w / w.sum()
    self.seed = int(seed)
    self.num_samples = int(sum(self.lengths) if num_samples is None else num_samples)
    self.block_size = int(block_size)
    if self.num_samples < 0 or self.block_size < 1:
      raise ValueError(f"num_samples={self.num_samples} and block_size={self.block_size} must be >= 0 / >= 1")

    n_full, last = divmod(self.num_samples, self.block_size)
    rng = np.random.default_rng(self.seed)
    counts = rng.multinomial(self.block_size, self.weights, size=n_full).astype(np.int64)
    if last:
      counts = np.concatenate([counts, rng.multinomial(last, self.weights)[None].astype(np.int64)])
    # start[b, j]: how many elements of source j come before block b
    self._block_start = np.concatenate([np.zeros((1, len(self.sources)), np.int64), np.cumsum(counts, axis=0)])
    self._block_counts = counts
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()  # grain may read from several threads

  def __len__(self) -> int:
    return self.num_samples

  def __repr__(self) -> str:
    parts = ", ".join(f"{n}={w:.3g}" for n, w in zip(self.names, self.weights))
    return f"BlendedSource({parts}, seed={self.seed}, num_samples={self.num_samples})"

  def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(component of each position, running rank of that component within the block)."""
    with self._lock:
      cached = self._cache.get(b)
    if cached is None:
      counts = self._block_counts[b]
      order = np.repeat(np.arange(len(self.sources), dtype=np.int32), counts)
      component = np.random.default_rng([self.seed, b]).permutation(order)
      sort = np.argsort(component, kind="stable")
      first = np.concatenate([[0], np.cumsum(counts)[:-1]])
      rank = np.empty(len(component), dtype=np.int64)
      rank[sort] = np.arange(len(component)) - first[component[sort]]
      cached = (component, rank)
      with self._lock:
        if len(self._cache) >= 4:
          self._cache.pop(next(iter(self._cache)))
        self._cache[b] = cached
    return cached

  def locate(self, index: int) -> tuple[int, int]:
    """(component j, index within sources[j]) of blend element ``index``."""
    index = int(index)
    if index < 0:
      index += self.num_samples
    if not 0 <= index < self.num_samples:
      raise IndexError(f"index {index} out of range for {self!r}")
    b, p = divmod(index, self.block_size)
    component, rank = self._block(b)
    j = int(component[p])
    return j, int((self._block_start[b, j] + rank[p]) % self.lengths[j])

  def __getitem__(self, index: int) -> Record:
    j, i = self.locate(index)
    record = dict(self.sources[j][i])
    record["source"] = self.names[j]
    return record

  def source_counts(self, stop: int | None = None) -> dict[str, int]:
    """Exact number of elements each component contributes to blend elements ``[0, stop)``."""
    stop = self.num_samples if stop is None else max(0, min(int(stop), self.num_samples))
    b, p = divmod(stop, self.block_size)
    counts = self._block_start[b].copy()  # b <= number of blocks, so the row exists
    if p:
      counts += np.bincount(self._block(b)[0][:p], minlength=len(self.sources))
    return {n: int(c) for n, c in zip(self.names, counts)}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cache = {}
    self._lock = threading.Lock()
