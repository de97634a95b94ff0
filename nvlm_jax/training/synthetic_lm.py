"""Text-only LM training data: synthetic token sequences as a grain pipeline (the "text LM" mode).

Used by configs/tiny_lm.py and the tests: it needs no tokenizer and no files, yet is a real grain
`MapDataset -> IterDataset` whose iterator checkpoints with orbax like the multimodal pipeline.

Each sample is a short arithmetic progression over the vocabulary, tokens (start + stride * j) mod V',
split into a "prompt" (no loss) and an "answer" (loss), so a tiny model learns it within a few hundred
steps (loss falls from ~log V towards 0) and the loss mask matters. Rows pack `samples_per_row`
samples with their own segment ids and positions restarting at 0, then padding (segment 0).

Sharding over processes: global batch s is rows [s*G, (s+1)*G); process p reads the contiguous block
[s*G + p*G/P, s*G + (p+1)*G/P), exactly the rows its devices hold in the global array, so a run on P
processes sees the same global batches as a run on one.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

RESERVED_IDS = 3  # 0 = pad, 1 = bos, 2 = eos; progressions use ids >= 3


@dataclasses.dataclass(frozen=True)
class SyntheticLMSpec:
  vocab_size: int
  seq_len: int
  samples_per_row: int = 2
  min_sample_len: int = 8
  prompt_len: int = 3
  max_stride: int = 7
  seed: int = 0

  def __post_init__(self):
    if self.vocab_size <= RESERVED_IDS + 1:
      raise ValueError(f"synthetic LM vocab_size={self.vocab_size} must exceed {RESERVED_IDS + 1}")
    if self.seq_len // self.samples_per_row < max(self.min_sample_len, self.prompt_len + 2):
      raise ValueError(
        f"seq_len={self.seq_len} too short for {self.samples_per_row} samples per row "
        f"of >= {self.min_sample_len} tokens"
      )


def make_row(spec: SyntheticLMSpec, row_index: int) -> dict[str, np.ndarray]:
  """One packed row in the training-batch contract (numpy, unbatched [L])."""
  rng = np.random.default_rng((spec.seed, int(row_index)))
  length = spec.seq_len
  out = {
    "input_ids": np.zeros(length, np.int32),
    "targets": np.zeros(length, np.int32),
    "loss_mask": np.zeros(length, np.float32),
    "segment_ids": np.zeros(length, np.int32),
    "positions": np.zeros(length, np.int32),
  }
  span = length // spec.samples_per_row
  modulus = spec.vocab_size - RESERVED_IDS
  cursor = 0
  for k in range(spec.samples_per_row):
    n = int(rng.integers(spec.min_sample_len, span + 1))
    start, stride = int(rng.integers(0, modulus)), int(rng.integers(1, spec.max_stride + 1))
    tokens = RESERVED_IDS + (start + stride * np.arange(n + 1)) % modulus
    tokens[0] = 1  # bos
    sl = slice(cursor, cursor + n)
    out["input_ids"][sl] = tokens[:-1]
    out["targets"][sl] = tokens[1:]
    # Loss on the answer: targets after the prompt (the first prompt_len tokens of the sample).
    out["loss_mask"][cursor + spec.prompt_len : cursor + n] = 1.0
    out["segment_ids"][sl] = k + 1
    out["positions"][sl] = np.arange(n)
    cursor += n
  return out


class _RowOfProcess:
  """local row k of process p -> global row index (picklable, for grain worker processes)."""

  def __init__(self, global_batch: int, local_batch: int, process_index: int):
    self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index

  def __call__(self, k):
    step, j = divmod(int(k), self.local_batch)
    return step * self.global_batch + self.process_index * self.local_batch + j


class _MakeRow:
  def __init__(self, spec: SyntheticLMSpec):
    self.spec = spec

  def __call__(self, row_index):
    return make_row(self.spec, row_index)


def synthetic_lm_dataset(
  spec: SyntheticLMSpec,
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_rows: int = 2**40,
) -> grain.MapDataset:
  """A MapDataset of this process's local batches (dicts of [G / P, L] arrays)."""
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {process_count} processes")
  local = global_batch_size // process_count
  rows = grain.MapDataset.range(num_rows // global_batch_size * local)
  rows = rows.map(_RowOfProcess(global_batch_size, local, process_index)).map(_MakeRow(spec))
  return rows.batch(local, drop_remainder=True)


def make_synthetic_lm_iterator(
  data_config, *, vocab_size: int, process_index: int = 0, process_count: int = 1, seed: int = 0
) -> grain.DatasetIterator:
  """The iterator the trainer uses for `config.data.kind == "synthetic_lm"`."""
  spec = SyntheticLMSpec(
    vocab_size=vocab_size,
    seq_len=data_config.seq_len,
    samples_per_row=data_config.get("samples_per_row", 2),
    min_sample_len=data_config.get("min_sample_len", 8),
    prompt_len=data_config.get("prompt_len", 3),
    seed=seed,
  )
  ds = synthetic_lm_dataset(
    spec, global_batch_size=data_config.global_batch_size, process_index=process_index, process_count=process_count
  )
  return iter(ds.to_iter_dataset())
