"""Sharded safetensors written one tensor at a time.

`safetensors_io.save_sharded` keeps up to one shard (5 GB by default) in memory before writing it.
When every tensor's name, shape and dtype are known in advance (they are: the rule table derives them
from the config), each shard's header can be written first and the tensors streamed into it as they
are produced, so memory stays at one tensor. The files are ordinary safetensors (8-byte header
length, JSON header padded to 8 bytes, contiguous little-endian data) plus
`model.safetensors.index.json`, as transformers writes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nvlm_jax.checkpoint.safetensors_io import DTYPES, INDEX_FILE, CheckpointError

_TAGS = {dtype: tag for tag, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  @property
  def tag(self) -> str:
    try:
      return _TAGS[np.dtype(self.dtype)]
    except KeyError:
      raise CheckpointError(f"tensor {self.name!r}: dtype {self.dtype} cannot be stored in safetensors") from None


def plan_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
  """Consecutive entries grouped into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
  shards: list[list[TensorEntry]] = []
  size = 0
  for entry in entries:
    if not shards or (shards[-1] and size + entry.nbytes > max_shard_bytes):
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += entry.nbytes
  return shards


def _header(entries: Sequence[TensorEntry], metadata: Mapping[str, str]) -> bytes:
  header: dict = {"__metadata__": dict(metadata)}
  offset = 0
  for e in entries:
    header[e.name] = {"dtype": e.tag, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
    offset += e.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  return struct.pack("<Q", len(blob)) + blob


class ShardedWriter:
  """Writes the planned tensors, in plan order, into model-0000k-of-0000n.safetensors + the index."""

  def __init__(
    self,
    directory: str | Path,
    entries: Sequence[TensorEntry],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
  ):
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
      raise CheckpointError("sharded writer: duplicate tensor names in the plan")
    self.directory = Path(directory)
    self.metadata = {"format": "pt", **(metadata or {})}  # transformers refuses files without format=pt
    self.shards = plan_shards(entries, max_shard_bytes)
    n = len(self.shards)
    self.files = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    self._queue = [(shard_index, entry) for shard_index, shard in enumerate(self.shards) for entry in shard]
    self._next = 0
    self._file = None
    self._file_index = -1
    self.bytes_written = 0

  def write(self, name: str, array: np.ndarray) -> None:
    if self._next >= len(self._queue):
      raise CheckpointError(f"sharded writer: unexpected extra tensor {name!r}")
    shard_index, entry = self._queue[self._next]
    if name != entry.name:
      raise CheckpointError(f"sharded writer: got {name!r}, expected {entry.name!r} next (export bug)")
    array = np.asarray(array)
    if tuple(array.shape) != entry.shape or array.dtype != entry.dtype:
      raise CheckpointError(
        f"sharded writer: {name!r} is {array.dtype} {tuple(array.shape)}, planned "
        f"{entry.dtype} {entry.shape} (export bug)"
      )
    if shard_index != self._file_index:
      self._close_file()
      self._file = open(self.directory / self.files[shard_index], "wb")
      self._file.write(_header(self.shards[shard_index], self.metadata))
      self._file_index = shard_index
    little = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    self._file.write(little.reshape(-1).view(np.uint8).data)
    self.bytes_written += entry.nbytes
    self._next += 1

  def __enter__(self) -> "ShardedWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self._close_file()  # on failure: the caller removes the half-written directory

  def _close_file(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self) -> Path:
    """Checks every planned tensor was written; writes the index; returns its path."""
    self._close_file()
    if self._next != len(self._queue):
      missing = [e.name for _, e in self._queue[self._next :]]
      raise CheckpointError(f"sharded writer: {len(missing)} planned tensors never written, e.g. {missing[:5]}")
    weight_map = {e.name: self.files[i] for i, shard in enumerate(self.shards) for e in shard}
    total = sum(e.nbytes for shard in self.shards for e in shard)
    index = self.directory / INDEX_FILE
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return index
