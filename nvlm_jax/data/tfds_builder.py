"""Convert conversation sources once into a TFDS ArrayRecord dataset, and read it back by random access.

Why: an ArrayRecord file holds each record with its image bytes inline, so training reads one file with
O(1) random access (grain's global shuffle, exact resume) instead of millions of loose image files.

Works WITHOUT tensorflow: ``GeneratorBasedBuilder`` writing ``file_format="array_record"`` and the
``as_data_source`` reader are the tf-free parts of TFDS. Features (one example = one record, records.py):

    id        Text
    source    Text
    messages  Text                 JSON list of {"role", "content"} (keeps the schema open, no nesting issues)
    images    Sequence(Image())    the ENCODED bytes, stored verbatim (JPEG stays JPEG, never re-encoded)
    error     Text                 JSON {"reason", "detail"} of a source's parse error, "" when none

On read, images are NOT decoded: ``ArrayRecordSource`` passes an identity decoder for ``images`` (TFDS's own
``SkipDecoding`` and ``DESERIALIZE_NO_DECODE`` both need tensorflow), so records come back exactly as the
sources produced them, bytes and all, and the pipeline decodes (and counts bad images) as usual.

An image path that cannot be read at conversion time is stored as empty bytes (-> ``missing_image`` when
validated), so indices stay aligned with the source; ``drop_bad=True`` instead drops every record that
fails ``validate_record`` and reports the counts per reason. Order is preserved (shuffling disabled), so
``ArrayRecordSource(...)[i]`` is the i-th converted record.

CLI::

    python -m nvlm_jax.data.tfds_builder --llava train.json --image-root images/ --out data/
    python -m nvlm_jax.data.tfds_builder --synthetic 10000 --seed 0 --out data/
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from nvlm_jax.data.llava import LlavaSource
from nvlm_jax.data.records import BadSampleError, Record, validate_record
from nvlm_jax.data.synthetic import SyntheticSource

BUILDER_NAME = "nvlm_conversations"
FEATURES_VERSION = "1.0.0"

log = logging.getLogger(__name__)


def record_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
    {
      "id": tfds.features.Text(),
      "source": tfds.features.Text(),
      "messages": tfds.features.Text(),
      "images": tfds.features.Sequence(tfds.features.Image()),
      "error": tfds.features.Text(),
    }
  )


class NvlmConversations(tfds.core.GeneratorBasedBuilder):
  """Records from any random-access sources, written in source order to ArrayRecord.

  ``splits`` maps a split name to a list of sources; a split is their concatenation.
  """

  VERSION = tfds.core.Version(FEATURES_VERSION)
  RELEASE_NOTES = {"1.0.0": "id, source, JSON messages, encoded image bytes, parse error."}
  # TFDS derives this from the package via importlib_resources (not installed); the file path is the same.
  code_path = epath.Path(__file__)

  def __init__(
    self, *, splits: dict[str, Sequence] | None = None, drop_bad: bool = False, check_images: bool = True, **kwargs
  ):
    kwargs.setdefault("file_format", "array_record")
    self._splits = splits or {}
    self._drop_bad = drop_bad
    self._check_images = check_images
    self.dropped: dict[str, collections.Counter] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="NVLM conversation records (records.py schema) with encoded images.",
      features=record_features(),
      disable_shuffling=True,  # keep source order: converted[i] == concatenated sources[i]
    )

  def _split_generators(self, dl_manager):
    if not self._splits:
      raise ValueError("NvlmConversations: nothing to convert; pass splits={'train': [source, ...]}")
    return {name: self._generate_examples(name, sources) for name, sources in self._splits.items()}

  def _generate_examples(self, split: str, sources: Sequence):
    dropped = self.dropped.setdefault(split, collections.Counter())
    key = 0
    for source in sources:
      for i in range(len(source)):
        record = source[i]
        example = record_to_example(record)
        if self._drop_bad:
          try:
            validate_record(_with_bytes(record, example), check_images=self._check_images)
          except BadSampleError as e:
            dropped[e.reason] += 1
            log.debug("dropping %s", e)
            continue
        yield f"{key:012d}", example
        key += 1


def _read_image(image, sample_id: str) -> bytes:
  if isinstance(image, (bytes, bytearray)):
    return bytes(image)
  try:
    return Path(image).read_bytes()
  except OSError as e:
    log.warning("sample %r: cannot read image %s (%s); stored as empty bytes", sample_id, image, e)
    return b""


def record_to_example(record: Record) -> dict:
  """A record as a TFDS example: image paths are read into bytes, messages JSON-encoded."""
  return {
    "id": record["id"],
    "source": record["source"],
    "messages": json.dumps(record["messages"], ensure_ascii=False),
    "images": [_read_image(im, record["id"]) for im in record["images"]],
    "error": json.dumps(record["error"], ensure_ascii=False) if record.get("error") else "",
  }


def _with_bytes(record: Record, example: dict) -> Record:
  return {**record, "images": example["images"]}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def example_to_record(example: dict) -> Record:
  record: Record = {
    "id": _text(example["id"]),
    "source": _text(example["source"]),
    "messages": json.loads(_text(example["messages"])),
    "images": [bytes(b) for b in example["images"]],
  }
  error = _text(example.get("error", b""))
  if error:
    record["error"] = json.loads(error)
  return record


class _KeepEncoded(tfds.decode.Decoder):
  """Identity decoder: hand back the stored image bytes (the numpy reader path needs the *_np methods)."""

  def decode_example(self, serialized_example):
    return serialized_example

  def decode_example_np(self, serialized_example):
    return serialized_example

  def decode_batch_example(self, serialized_example):
    return serialized_example

  def decode_batch_example_np(self, serialized_example):
    return serialized_example


def find_builder_dir(path: str | os.PathLike, name: str | None = None) -> Path:
  """The directory holding ``dataset_info.json``: ``path`` itself, or the highest version under
  ``path/nvlm_conversations[/name]`` or ``path[/name]``."""
  path = Path(path)
  if (path / "dataset_info.json").is_file():
    return path
  sub = [name] if name else []
  for base in (path.joinpath(BUILDER_NAME, *sub), path.joinpath(*sub)):
    versions = [d for d in base.glob("*.*.*") if (d / "dataset_info.json").is_file()]
    if versions:
      return max(versions, key=lambda d: tuple(int(x) if x.isdigit() else -1 for x in d.name.split(".")))
  named = sorted({d.parent.name for d in path.glob(f"{BUILDER_NAME}/*/*.*.*") if (d / "dataset_info.json").is_file()})
  raise FileNotFoundError(
    f"no TFDS dataset (dataset_info.json) under {path}"
    + (f" named {name!r}" if name else "")
    + (
      f"; it holds the named dataset(s) {named}: pick one with --dataset-name (data config: dataset_name)"
      if named
      else ""
    )
    + f"; expected {path}/{BUILDER_NAME}/[NAME/]{FEATURES_VERSION}/ as written by "
    f"`python -m nvlm_jax.data.tfds_builder --out {path}`"
  )


class ArrayRecordSource:
  """Random-access records from a converted dataset; usable as ``grain.MapDataset.source(...)``.

  Picklable: only (directory, split) travel to grain workers; each process reopens the files.
  """

  def __init__(
    self, path: str | os.PathLike, split: str = "train", *, dataset_name: str | None = None, name: str | None = None
  ):
    """``path``: builder dir or the ``--out`` data dir (+ ``dataset_name`` if converted with ``--name``);
    ``name``: this source's name in blends (default ``<dataset>/<split>``)."""
    self.builder_dir = find_builder_dir(path, dataset_name)
    self.split = split
    self.name = name or f"{self.builder_dir.parent.name}/{split}"
    self._open()

  def _open(self) -> None:
    builder = tfds.builder_from_directory(os.fspath(self.builder_dir))
    if self.split not in builder.info.splits:
      raise KeyError(f"split {self.split!r} not in {self.builder_dir} (has {sorted(builder.info.splits)})")
    self._data = builder.as_data_source(self.split, decoders={"images": _KeepEncoded()})

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_data"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> Record:
    n = len(self._data)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for {self!r} with {n} records")
    return example_to_record(self._data[index])

  def __repr__(self) -> str:
    return f"ArrayRecordSource({str(self.builder_dir)!r}, split={self.split!r})"


def convert(
  sources: Sequence | dict[str, Sequence],
  out_dir: str | os.PathLike,
  *,
  split: str = "train",
  name: str | None = None,
  drop_bad: bool = False,
  check_images: bool = True,
  overwrite: bool = False,
) -> tuple[Path, dict[str, collections.Counter]]:
  """Writes ``sources`` (a list for one split, or {split: [sources]}) under ``out_dir``.

  ``name`` (optional) keeps several converted datasets apart in one ``out_dir``
  (``out_dir/nvlm_conversations/<name>/<version>``). Returns (builder dir, {split: Counter of dropped
  reasons}). An existing dataset at that place is an error unless ``overwrite``: TFDS would otherwise
  silently keep the old files.
  """
  splits = sources if isinstance(sources, dict) else {split: list(sources)}
  kwargs = {"config": tfds.core.BuilderConfig(name=name)} if name else {}
  builder = NvlmConversations(
    splits=splits, data_dir=os.fspath(out_dir), drop_bad=drop_bad, check_images=check_images, **kwargs
  )
  builder_dir = Path(builder.data_dir)
  if (builder_dir / "dataset_info.json").exists():
    if not overwrite:
      raise FileExistsError(
        f"{builder_dir} already holds a converted dataset; pass overwrite=True "
        "(--overwrite) or choose another out dir / name"
      )
    shutil.rmtree(builder_dir)
  builder.download_and_prepare()
  return builder_dir, builder.dropped


def main(argv: Iterable[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m nvlm_jax.data.tfds_builder", description=__doc__.split("\n")[0])
  parser.add_argument("--llava", nargs="+", default=[], metavar="FILE", help="LLaVA-style .json/.jsonl files")
  parser.add_argument(
    "--image-root",
    default=None,
    help="directory the LLaVA image paths are relative to (default: each file's directory)",
  )
  parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="add N synthetic samples")
  parser.add_argument("--seed", type=int, default=0, help="synthetic seed")
  parser.add_argument("--synthetic-size", default="tiny", help="synthetic size preset: tiny | paper")
  parser.add_argument("--text-only-fraction", type=float, default=0.2)
  parser.add_argument("--split", default="train")
  parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
  parser.add_argument("--name", default=None, help="optional dataset name (a TFDS config) under --out")
  parser.add_argument("--drop-bad", action="store_true", help="drop records failing validate_record")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing converted dataset")
  args = parser.parse_args(None if argv is None else list(argv))

  sources = [LlavaSource(f, args.image_root) for f in args.llava]
  if args.synthetic:
    sources.append(
      SyntheticSource(args.synthetic, args.seed, size=args.synthetic_size, text_only_fraction=args.text_only_fraction)
    )
  if not sources:
    parser.error("nothing to convert: give --llava FILE... and/or --synthetic N")
  try:
    builder_dir, dropped = convert(
      sources, args.out, split=args.split, name=args.name, drop_bad=args.drop_bad, overwrite=args.overwrite
    )
  except FileExistsError as e:
    parser.error(str(e))
  n = len(ArrayRecordSource(builder_dir, args.split))
  print(f"wrote {n} records to {builder_dir} (split {args.split!r}) from {len(sources)} source(s)")
  for reason, count in sorted(dropped.get(args.split, {}).items()):
    print(f"  dropped {count} x {reason}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
