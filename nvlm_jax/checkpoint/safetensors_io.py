"""Reading and writing Hugging Face safetensors checkpoints, one tensor at a time.

A checkpoint directory holds either one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Every shard's header is parsed and validated when the checkpoint is
opened (missing shard, truncated file, duplicate key, index out of step with the shards), so a broken
download fails before gigabytes are read. Tensors are then memory-mapped one at a time: a 72B
checkpoint never has to fit in host memory.

We parse the safetensors format ourselves (8-byte little-endian header length, JSON header, raw
little-endian data) rather than going through `safetensors.safe_open(framework="numpy")`, because numpy
has no bfloat16: ml_dtypes provides the dtype and `np.memmap` maps the bytes directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HEADER_LEN_BYTES = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit

# safetensors dtype tag <-> numpy dtype (bf16 and fp8 come from ml_dtypes).
DTYPES: dict[str, np.dtype] = {
  "BOOL": np.dtype(np.bool_),
  "U8": np.dtype(np.uint8),
  "I8": np.dtype(np.int8),
  "U16": np.dtype("<u2"),
  "I16": np.dtype("<i2"),
  "U32": np.dtype("<u4"),
  "I32": np.dtype("<i4"),
  "U64": np.dtype("<u8"),
  "I64": np.dtype("<i8"),
  "F16": np.dtype("<f2"),
  "F32": np.dtype("<f4"),
  "F64": np.dtype("<f8"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_TAGS = {dt: tag for tag, dt in DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as asked; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: its file, dtype tag, shape and absolute byte range in the file."""

  name: str
  file: Path
  dtype: str
  shape: tuple[int, ...]
  start: int
  end: int

  @property
  def np_dtype(self) -> np.dtype:
    return DTYPES[self.dtype]


def read_header(file: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and validates one .safetensors header -> ({name: TensorInfo}, __metadata__)."""
  file = Path(file)
  size = file.stat().st_size
  with open(file, "rb") as f:
    raw_len = f.read(_HEADER_LEN_BYTES)
    if len(raw_len) < _HEADER_LEN_BYTES:
      raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > _MAX_HEADER_BYTES:
      raise CheckpointError(f"{file}: not a safetensors file (header length {header_len} bytes)")
    if _HEADER_LEN_BYTES + header_len > size:
      raise CheckpointError(
        f"{file}: truncated safetensors file: header needs {_HEADER_LEN_BYTES + header_len} bytes, file has {size}"
      )
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
  metadata = header.pop("__metadata__", None) or {}
  data_start = _HEADER_LEN_BYTES + header_len
  infos, data_end = {}, data_start
  for name, entry in header.items():
    try:
      dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{file}: corrupt header entry for {name!r}: {entry!r}") from None
    if dtype not in DTYPES:
      raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype!r}")
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
    if end - begin != expected_bytes or begin < 0:
      raise CheckpointError(
        f"{file}: tensor {name!r} ({dtype} {list(shape)}) spans bytes [{begin}, {end}), expected {expected_bytes} bytes"
      )
    infos[name] = TensorInfo(name, file, dtype, shape, data_start + begin, data_start + end)
    data_end = max(data_end, data_start + end)
  if data_end > size:
    last = max(infos.values(), key=lambda i: i.end)
    raise CheckpointError(
      f"{file}: truncated safetensors file: header says {data_end} bytes (tensor {last.name!r} ends "
      f"there), file has {size}"
    )
  return infos, metadata


class SafetensorsCheckpoint(Mapping[str, TensorInfo]):
  """A validated HF checkpoint directory (or a single .safetensors file), read lazily.

  Maps tensor name -> TensorInfo; `read(name)` memory-maps one tensor as a read-only numpy array.
  """

  def __init__(self, path: str | os.PathLike):
    path = Path(path)
    self.path = path
    if path.is_file():
      files = [path]
      index = None
    elif (path / INDEX_FILE).is_file():
      index = self._read_index(path / INDEX_FILE)
      files = sorted({path / f for f in index.values()})
    elif (path / SINGLE_FILE).is_file():
      files, index = [path / SINGLE_FILE], None
    else:
      raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")
    if index is not None:
      for file in files:
        if not file.is_file():
          example = next(k for k, f in index.items() if path / f == file)
          raise CheckpointError(f"{path / INDEX_FILE}: shard {file.name} is missing (it holds e.g. {example!r})")
    self._infos: dict[str, TensorInfo] = {}
    self.metadata: dict[str, str] = {}
    for file in files:
      infos, metadata = read_header(file)
      self.metadata.update(metadata)
      for name, info in infos.items():
        if name in self._infos:
          raise CheckpointError(
            f"{path}: tensor {name!r} is stored twice: in {self._infos[name].file.name} and {file.name}"
          )
        self._infos[name] = info
    if index is not None:
      for name, shard in index.items():
        if name not in self._infos:
          raise CheckpointError(f"{path / INDEX_FILE}: lists {name!r} in {shard}, but that shard lacks it")
        if self._infos[name].file.name != Path(shard).name:
          raise CheckpointError(
            f"{path / INDEX_FILE}: lists {name!r} in {shard}, but it is stored in {self._infos[name].file.name}"
          )

  @staticmethod
  def _read_index(index_file: Path) -> dict[str, str]:
    try:
      weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index_file}: not a safetensors index (no valid 'weight_map': {e})") from None
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to shard files")
    return weight_map

  # Mapping interface: name -> TensorInfo.
  def __getitem__(self, name: str) -> TensorInfo:
    try:
      return self._infos[name]
    except KeyError:
      raise KeyError(f"{self.path}: no tensor {name!r}") from None

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def __len__(self) -> int:
    return len(self._infos)

  def file_of(self, name: str) -> str:
    """The shard file name holding `name` (for error messages)."""
    return self[name].file.name

  def read(self, name: str) -> np.ndarray:
    """One tensor, memory-mapped read-only (no copy until the caller transforms it)."""
    info = self[name]
    if 0 in info.shape:
      return np.zeros(info.shape, info.np_dtype)
    return np.memmap(info.file, dtype=info.np_dtype, mode="r", offset=info.start, shape=info.shape)


def open_checkpoint(path: str | os.PathLike) -> SafetensorsCheckpoint:
  return SafetensorsCheckpoint(path)


# ----------------------------------------------------------------------------------------------------
# Writing


def _tag(array: np.ndarray, name: str) -> str:
  try:
    return _TAGS[array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype]
  except KeyError:
    raise CheckpointError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors") from None


def write_safetensors(
  file: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> int:
  """Writes one .safetensors file, streaming each tensor's bytes; returns the data size in bytes."""
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  arrays = {}
  for name, array in tensors.items():
    array = np.asarray(array)
    tag = _tag(array, name)
    nbytes = array.size * array.dtype.itemsize
    header[name] = {"dtype": tag, "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
    arrays[name] = array
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference writer does
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in arrays.values():
      little = array.astype(array.dtype.newbyteorder("<"), copy=False)
      f.write(np.ascontiguousarray(little).reshape(-1).view(np.uint8))  # no extra copy when contiguous
  return offset


def save_sharded(
  tensors: Iterable[tuple[str, np.ndarray]],
  out_dir: str | os.PathLike,
  max_shard_bytes: int = 5 * 1024**3,
  *,
  metadata: Mapping[str, str] | None = None,
) -> Path:
  """Writes `model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json`; returns the index path.

  Tensors are consumed lazily and at most one shard's worth is held at a time. A tensor larger than
  `max_shard_bytes` gets a shard of its own. dtypes are kept (bf16 round-trips bit-exactly).
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  metadata = {"format": "pt", **(metadata or {})}  # transformers refuses files without format=pt
  temp_names: list[tuple[Path, list[str]]] = []
  seen: set[str] = set()
  total = 0
  pending: dict[str, np.ndarray] = {}
  pending_bytes = 0

  def flush():
    nonlocal pending, pending_bytes, total
    if not pending:
      return
    temp = out_dir / f".shard-{len(temp_names):05d}.safetensors.tmp"
    total += write_safetensors(temp, pending, metadata)
    temp_names.append((temp, list(pending)))
    pending, pending_bytes = {}, 0

  for name, array in tensors:
    if name in seen:
      raise CheckpointError(f"save_sharded: tensor {name!r} given twice")
    seen.add(name)
    array = np.asarray(array)
    nbytes = array.size * array.dtype.itemsize
    if pending and pending_bytes + nbytes > max_shard_bytes:
      flush()
    pending[name] = array
    pending_bytes += nbytes
  flush()
  if not temp_names:
    raise CheckpointError("save_sharded: no tensors to save")

  n = len(temp_names)
  weight_map = {}
  for k, (temp, names) in enumerate(temp_names, start=1):
    final = f"model-{k:05d}-of-{n:05d}.safetensors"
    os.replace(temp, out_dir / final)
    weight_map.update({name: final for name in names})
  index = out_dir / INDEX_FILE
  index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  return index
