"""Our orbax checkpoint format, written and read one tensor (one layer slice) at a time.

`orbax.checkpoint` saves and restores whole pytrees of device arrays: converting a 159 GB checkpoint
through it means holding the whole model in (host or device) memory. Orbax's on-disk format, however,
is plain TensorStore: every parameter is a zarr array inside one OCDBT key-value database per item,
next to a `_METADATA` JSON naming the tree. This module writes exactly that format directly with
TensorStore, so a stacked [layers, ...] parameter is filled layer slice by layer slice and nothing
larger than one slice (plus a bounded number of in-flight chunk writes) is ever in memory; and reads
it back the same way. The step directory around it (`_CHECKPOINT_METADATA`, the `model` JSON item)
is written by orbax itself.

The result is an ordinary orbax checkpoint in the layout of nvlm_jax/checkpoint/orbax_checkpoint.py:

    WORKDIR/nvlm_model.json, WORKDIR/checkpoints/<step>/{model, params}

so `models.load_checkpoint(WORKDIR)` and `train.py --config.init_from=WORKDIR` restore it with
`StandardRestore` onto any mesh. Tests restore what this module writes through orbax.

Chunking: a stacked parameter gets one chunk row per layer; with a mesh, chunks are additionally cut
at the mesh shard boundaries (from the logical-axis rules), so restoring onto that mesh reads whole
chunks per device; and no chunk is larger than `max_chunk_bytes`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from nvlm_jax.checkpoint.safetensors_io import CheckpointError
from nvlm_jax.sharding import LOGICAL_AXIS_RULES
from nvlm_jax.checkpoint import orbax_checkpoint

PARAMS_ITEM = "params"
MODEL_ITEM = "model"
PYTREE_METADATA_FILE = "_METADATA"  # orbax's tree metadata file of a PyTree item
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's per-step metadata (item handlers, timestamps)
_DICT_KEY = 2  # orbax tree metadata KeyType.DICT
DEFAULT_MAX_CHUNK_BYTES = 16 * 1024**2
DEFAULT_INFLIGHT_BYTES = 128 * 1024**2
COMPRESSIONS = ("zstd", "none")
_OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000, "manifest_kind": "single"}
_OCDBT_DATA_FILE_BYTES = 2**31  # orbax's default target size of one OCDBT data file


def _zarr_dtype(dtype: np.dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype == np.dtype(ml_dtypes.bfloat16):
    return "bfloat16"
  return dtype.newbyteorder("<").str if dtype.itemsize > 1 else dtype.str


def _context() -> ts.Context:
  # No chunk cache: every chunk is written (or read) once. file_io_concurrency as orbax sets it.
  return ts.Context(
    {
      "file_io_concurrency": {"limit": 128},
      "cache_pool": {"total_bytes_limit": 0},
      "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
    }
  )


def _ocdbt_kvstore(directory: Path, *, write: bool) -> dict:
  base = {"driver": "file", "path": f"{directory.absolute()}/"}
  if not write:
    return {"driver": "ocdbt", "base": base, "cache_pool": "cache_pool#ocdbt"}
  # As orbax writes on local disks: data files non-atomically (no renames), the manifest atomically.
  return {
    "driver": "ocdbt",
    "base": {**base, "file_io_locking": {"mode": "non_atomic"}},
    "manifest": base,
    "config": dict(_OCDBT_CONFIG),
    "target_data_file_size": _OCDBT_DATA_FILE_BYTES,
    "assume_config": True,
    "cache_pool": "cache_pool#ocdbt",
  }


def array_name(path: str) -> str:
  """Orbax's storage name of a param: its tree keys joined with '.' ('a/b/kernel' -> 'a.b.kernel')."""
  return path.replace("/", ".")


# ----------------------------------------------------------------------------------------------------
# Chunk layout


def _smallest_factor(n: int) -> int:
  for f in range(2, int(math.isqrt(n)) + 1):
    if n % f == 0:
      return f
  return n


def chunk_shape(
  shape: Sequence[int],
  itemsize: int,
  *,
  stacked: int = 0,
  shard_shape: Sequence[int] | None = None,
  max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple:
  """One layer of one mesh shard, cut into row blocks of <= max_chunk_bytes.

  Rows (the leading dims) are cut first, by the smallest factor of the dim, so that a chunk is a
  contiguous block of rows: the writer then writes (and the reader reads) a bounded number of whole
  chunks at a time. Every chunk boundary is also a shard boundary (factors of the shard shape), so no
  chunk straddles two devices' shards.
  """
  chunks = list(shard_shape if shard_shape is not None else shape)
  for axis in range(min(int(stacked), len(chunks))):  # stacked layer axes: one layer per chunk
    chunks[axis] = 1
  chunks = [max(1, int(c)) for c in chunks]
  while math.prod(chunks) * itemsize > max_chunk_bytes:
    dims = [i for i in range(len(chunks)) if chunks[i] > 1]
    if not dims:
      break
    chunks[dims[0]] //= _smallest_factor(chunks[dims[0]])
  return tuple(chunks)


def _logical_specs(boxed_params: Any) -> dict[str, tuple]:
  import flax.linen as nn
  from flax import traverse_util

  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed_params), sep="/")
  return {p: tuple(s) if s is not None else () for p, s in specs.items()}


def shard_shapes(boxed_params: Any, mesh_shape: Mapping[str, int] | None, rules) -> dict[str, tuple]:
  """{param path: shape of one device's shard} on a mesh of `mesh_shape` (no devices needed)."""
  import flax.linen as nn
  from flax import traverse_util

  shapes = traverse_util.flatten_dict(nn.meta.unbox(boxed_params), sep="/")
  if not mesh_shape:
    return {p: tuple(s.shape) for p, s in shapes.items()}
  specs = _logical_specs(boxed_params)
  out = {}
  for path, struct in shapes.items():
    mesh_axes = tuple(nn.logical_to_mesh_axes(specs[path], rules)) if specs.get(path) else ()
    dims = []
    for i, size in enumerate(struct.shape):
      axes = mesh_axes[i] if i < len(mesh_axes) else None
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(int(mesh_shape.get(a, 1)) for a in axes)
      dims.append(-(-size // ways))
    out[path] = tuple(dims)
  return out


def is_layer_axis(name) -> bool:
  """A logical axis that stacks scanned layers: "layers", NVLM-X/H's "layer_groups", ..."""
  return isinstance(name, str) and "layer" in name


def param_specs(
  boxed_params: Any,
  dtype: str | None = None,
  *,
  mesh_shape: Mapping[str, int] | None = None,
  rules=None,
  max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> dict[str, "ParamSpec"]:
  """A ParamSpec per model param (from `jax.eval_shape` of the init, logical axes included).

  dtype: storage dtype of every floating param (None: the model's param dtype). A param whose leading
  logical axes are layer axes ("layers"; NVLM-X/H groups add "layer_groups") is stacked and is
  written one layer at a time.
  """
  import flax.linen as nn
  from flax import traverse_util

  rules = LOGICAL_AXIS_RULES if rules is None else rules
  shapes = traverse_util.flatten_dict(nn.meta.unbox(boxed_params), sep="/")
  logical = _logical_specs(boxed_params)
  shards = shard_shapes(boxed_params, mesh_shape, rules)
  out = {}
  for path, struct in shapes.items():
    stored = np.dtype(struct.dtype)
    if dtype is not None and (np.issubdtype(stored, np.floating) or stored.name == "bfloat16"):
      stored = np.dtype(jax.numpy.dtype(dtype))
    names = logical.get(path) or ()
    stacked = next((i for i, name in enumerate(names) if not is_layer_axis(name)), len(names))
    out[path] = ParamSpec(
      tuple(struct.shape),
      stored,
      chunk_shape(
        struct.shape, stored.itemsize, stacked=stacked, shard_shape=shards[path], max_chunk_bytes=max_chunk_bytes
      ),
      stacked,
    )
  return out


# ----------------------------------------------------------------------------------------------------
# Writing


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter to write: full shape (stacked axis included), storage dtype, chunk shape."""

  shape: tuple[int, ...]
  dtype: np.dtype
  chunks: tuple[int, ...]
  stacked: int = 0  # leading layer axes; written one [layer] (or [group, layer]) slice at a time

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class ParamWriter:
  """Writes a params item (orbax PyTree layout, OCDBT + zarr) one array or one layer slice at a time.

  Writes are asynchronous; at most `inflight_bytes` of issued-but-uncommitted data is outstanding,
  so memory stays at the caller's current tensor plus that bound. `close()` checks that every
  parameter (every layer of every stacked one) was written exactly once and writes `_METADATA`.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    specs: Mapping[str, ParamSpec],
    *,
    compression: str = "zstd",
    inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
  ):
    if compression not in COMPRESSIONS:
      raise ValueError(f"compression {compression!r}; expected one of {COMPRESSIONS}")
    self.directory = Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.specs = dict(specs)
    self._compressor = {"id": "zstd", "level": 1} if compression == "zstd" else None
    self.inflight_bytes = self._inflight_limit = max(1, int(inflight_bytes))
    self._context = _context()
    self._kvstore = _ocdbt_kvstore(self.directory, write=True)
    self._stores: dict[str, ts.TensorStore] = {}
    self._pending: collections.deque = collections.deque()
    self._pending_bytes = 0
    self._written: dict[str, set] = {p: set() for p in self.specs}
    self.bytes_written = 0

  def _store(self, path: str) -> ts.TensorStore:
    if path not in self._stores:
      spec = self.specs[path]
      metadata = {
        "shape": list(spec.shape),
        "chunks": list(spec.chunks),
        "dtype": _zarr_dtype(spec.dtype),
        "compressor": self._compressor,
        "dimension_separator": ".",
        "fill_value": None,
        "order": "C",
        "filters": None,
      }
      self._stores[path] = ts.open(
        {
          "driver": "zarr",
          "kvstore": {**self._kvstore, "path": array_name(path) + "/"},
          "metadata": metadata,
          "recheck_cached_data": False,
          "recheck_cached_metadata": False,
        },
        create=True,
        context=self._context,
      ).result()
    return self._stores[path]

  def write(self, path: str, array: np.ndarray, index: int | tuple[int, ...] | None = None) -> None:
    """Writes the whole param (`index` None) or one layer slice of a stacked param: [index], or
    [group, layer] for params with two layer axes."""
    if path not in self.specs:
      raise CheckpointError(f"writer: {path!r} is not a parameter of this checkpoint")
    spec = self.specs[path]
    index = (index,) if isinstance(index, (int, np.integer)) else index
    where = "" if index is None else str(list(index))
    if index is not None and len(index) > spec.stacked:
      raise CheckpointError(f"writer: {path} has {spec.stacked} stacked axes; cannot write slice {where}")
    expected = spec.shape[len(index) :] if index is not None else spec.shape
    if tuple(array.shape) != tuple(expected):
      raise CheckpointError(f"writer: {path}{where} has shape {tuple(array.shape)}, expected {tuple(expected)}")
    done = self._written[path]
    key = "all" if index is None else tuple(int(i) for i in index)
    if "all" in done or (index is None and done) or key in done:
      raise CheckpointError(f"writer: {path}{where} written twice")
    array = np.asarray(array)
    if array.dtype != spec.dtype:
      array = array.astype(spec.dtype)
    store = self._store(path)
    target = store if index is None else store[key]
    if array.ndim == 0:
      self._issue(target.write(array, can_reference_source_data_indefinitely=True), array.nbytes)
    else:
      # Blocks of whole chunk rows along the first axis, at most ~inflight_bytes each: TensorStore
      # never copies a whole (possibly multi-GB) tensor at once, and no chunk is written twice.
      rows = max(1, spec.chunks[0 if index is None else len(index)])
      row_bytes = max(1, array[:1].nbytes)
      step = max(rows, self._inflight_limit // row_bytes // rows * rows)
      for start in range(0, array.shape[0], step):
        stop = min(start + step, array.shape[0])
        block = array[start:stop]
        self._issue(target[start:stop].write(block, can_reference_source_data_indefinitely=True), block.nbytes)
    done.add(key)

  def _issue(self, future, nbytes: int) -> None:
    self._pending.append((future, nbytes))
    self._pending_bytes += nbytes
    self.bytes_written += nbytes
    self._drain(self._inflight_limit)

  @property
  def pending_bytes(self) -> int:
    """Bytes issued to TensorStore and not yet committed."""
    return self._pending_bytes

  def wait(self, limit: int = 0) -> None:
    """Blocks until at most `limit` bytes are uncommitted."""
    self._drain(limit)

  def _drain(self, limit: int) -> None:
    while self._pending and self._pending_bytes > limit:
      future, nbytes = self._pending.popleft()
      future.result()
      self._pending_bytes -= nbytes

  def abort(self) -> None:
    """Waits for the writes already issued (ignoring their errors) so no file appears afterwards."""
    while self._pending:
      future, _ = self._pending.popleft()
      try:
        future.result()
      except Exception:  # noqa: BLE001 - we are already failing; the first error is the one to report
        pass
    self._pending_bytes = 0
    self._stores.clear()

  def __enter__(self) -> "ParamWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()

  def missing(self) -> list[str]:
    out = []
    for path, spec in self.specs.items():
      done = self._written[path]
      if "all" in done:
        continue
      if not done:
        out.append(path)
        continue
      depth = len(next(iter(done)))
      gaps = sorted(set(np.ndindex(*spec.shape[:depth])) - done)
      if gaps:
        out.append(f"{path} (slices {gaps[:8]}{' ...' if len(gaps) > 8 else ''})")
    return out

  def close(self) -> None:
    """Waits for every write, checks completeness, writes the tree metadata."""
    self._drain(0)
    missing = self.missing()
    if missing:
      raise CheckpointError("writer: parameters never written (a conversion bug):\n  " + "\n  ".join(missing[:20]))
    write_tree_metadata(self.directory, {p: s.shape for p, s in self.specs.items()})
    self._stores.clear()


def write_tree_metadata(directory: Path, shapes: Mapping[str, Sequence[int]]) -> None:
  """orbax's `_METADATA` for a dict-of-dicts tree of jax.Arrays stored in OCDBT zarr2 arrays."""
  tree = {}
  for path, shape in shapes.items():
    keys = tuple(path.split("/"))
    tree[str(keys)] = {
      "key_metadata": [{"key": k, "key_type": _DICT_KEY} for k in keys],
      "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
    }
  content = {
    "tree_metadata": tree,
    "use_ocdbt": True,
    "use_zarr3": False,
    "store_array_data_equal_to_fill_value": True,
    "custom_metadata": None,
  }
  (Path(directory) / PYTREE_METADATA_FILE).write_text(json.dumps(content))


# ----------------------------------------------------------------------------------------------------
# The step directory around the params item


def start_checkpoint(workdir: Path, description: Mapping[str, Any], step: int = 0) -> Path:
  """Creates WORKDIR/checkpoints/<step>/ with its `model` item (written by orbax) and
  WORKDIR/nvlm_model.json; returns the directory the params item goes into."""

  directory = workdir / orbax_checkpoint.CHECKPOINT_SUBDIR
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    manager.save(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonSave(dict(description))}))
    manager.wait_until_finished()
  (workdir / orbax_checkpoint.MODEL_DESCRIPTION_FILE).write_text(json.dumps(description, indent=2, sort_keys=True))
  return directory / str(step) / PARAMS_ITEM


def register_params_item(params_dir: Path) -> None:
  """Adds the params item to the step's `_CHECKPOINT_METADATA`, naming the handler orbax uses for it
  (StandardSave / StandardRestore), as a trainer-written step has it."""
  meta_file = params_dir.parent / STEP_METADATA_FILE
  meta = json.loads(meta_file.read_text())
  handler = ocp.StandardCheckpointHandler
  meta.setdefault("item_handlers", {})[PARAMS_ITEM] = f"{handler.__module__}.{handler.__qualname__}"
  tmp = meta_file.with_name(meta_file.name + ".tmp")
  tmp.write_text(json.dumps(meta))
  tmp.replace(meta_file)


# ----------------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class StoredArray:
  """One stored param: shape, dtype, chunk shape (from the zarr metadata)."""

  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  chunks: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class ParamReader:
  """Reads a params item written by orbax (trainer) or by ParamWriter, one array or layer at a time.

  A layer read decodes the chunk row holding that layer and keeps it in a small LRU cache (at most
  `cache_bytes`, the newest block always kept), so layers read in order never decode a chunk twice
  and memory stays bounded whatever the checkpoint size.
  """

  def __init__(self, directory: str | os.PathLike, cache_bytes: int = DEFAULT_INFLIGHT_BYTES):
    self.directory = Path(directory)
    meta_file = self.directory / PYTREE_METADATA_FILE
    if not meta_file.is_file():
      raise CheckpointError(f"{self.directory}: not an orbax PyTree item (no {PYTREE_METADATA_FILE})")
    try:
      meta = json.loads(meta_file.read_text())
      tree = meta["tree_metadata"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{meta_file}: unreadable orbax tree metadata ({e})") from None
    self.use_ocdbt = bool(meta.get("use_ocdbt", True))
    self.use_zarr3 = bool(meta.get("use_zarr3", False))
    self._context = _context()
    self._stores: dict[str, ts.TensorStore] = {}
    self._blocks: collections.OrderedDict[str, tuple[int, np.ndarray]] = collections.OrderedDict()
    self.cache_bytes = cache_bytes
    self.arrays: dict[str, StoredArray] = {}
    for entry in tree.values():
      keys = [str(k["key"]) for k in entry["key_metadata"]]
      value_type = entry.get("value_metadata", {}).get("value_type")
      if value_type not in ("jax.Array", "np.ndarray"):
        raise CheckpointError(f"{meta_file}: leaf {'/'.join(keys)} has type {value_type!r}; only arrays can be read")
      path = "/".join(keys)
      store = self._open(path)
      chunks = tuple(store.chunk_layout.read_chunk.shape)
      self.arrays[path] = StoredArray(path, tuple(store.shape), np.dtype(store.dtype.numpy_dtype), chunks)

  def _open(self, path: str) -> ts.TensorStore:
    if path not in self._stores:
      name = array_name(path)
      if self.use_ocdbt:
        kvstore = {**_ocdbt_kvstore(self.directory, write=False), "path": name + "/"}
      else:
        kvstore = {"driver": "file", "path": f"{(self.directory / name).absolute()}/"}
      spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kvstore}
      try:
        self._stores[path] = ts.open(spec, open=True, read=True, context=self._context).result()
      except ValueError as e:
        raise CheckpointError(f"{self.directory}: cannot open stored array {name!r} ({e})") from None
    return self._stores[path]

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {p: a.shape for p, a in self.arrays.items()}

  def read(self, path: str, layer: int | None = None) -> np.ndarray:
    """The whole array, or slice [layer] of a stacked one."""
    if path not in self.arrays:
      raise CheckpointError(f"{self.directory}: no stored parameter {path!r}")
    store = self._open(path)
    if layer is None:
      return store.read().result()
    rows = max(1, self.arrays[path].chunks[0])
    block_index = layer // rows
    cached = self._blocks.get(path)
    if cached is None or cached[0] != block_index:
      self._blocks.pop(path, None)
      start = block_index * rows
      cached = (block_index, store[start : min(start + rows, store.shape[0])].read().result())
      self._blocks[path] = cached
      # Least recently used blocks go first; the newest always stays.
      while len(self._blocks) > 1 and sum(b.nbytes for _, b in self._blocks.values()) > self.cache_bytes:
        self._blocks.popitem(last=False)
    self._blocks.move_to_end(path)
    return cached[1][layer - block_index * rows]

  def release(self, path: str | None = None) -> None:
    """Drops the cached block of `path` (or all)."""
    if path is None:
      self._blocks.clear()
    else:
      self._blocks.pop(path, None)

  def lazy_tree(self, prefix: str = "") -> dict:
    """Nested dict of LazyArray leaves (for RuleTable.to_hf, which reads `leaf[layer]` or the whole leaf).
    With `prefix` ('language_model'), only that subtree, re-rooted."""
    from flax import traverse_util

    flat = {}
    for path in self.arrays:
      if prefix and not path.startswith(prefix.rstrip("/") + "/"):
        continue
      flat[path[len(prefix.rstrip("/")) + 1 :] if prefix else path] = LazyArray(self, path)
    return traverse_util.unflatten_dict(flat, sep="/")


class LazyArray:
  """A stored param that reads itself on indexing (`x[layer]`) or on `np.asarray(x)`."""

  def __init__(self, reader: ParamReader, path: str):
    self._reader, self.path = reader, path
    info = reader.arrays[path]
    self.shape, self.dtype = info.shape, info.dtype
    self.ndim = len(info.shape)

  def __getitem__(self, index):
    if isinstance(index, (int, np.integer)):
      return self._reader.read(self.path, int(index))
    return np.asarray(self)[index]

  def __array__(self, dtype=None, copy=None):
    array = self._reader.read(self.path)
    return array if dtype is None else array.astype(dtype)

  def __repr__(self):
    return f"LazyArray({self.path}, {self.shape}, {self.dtype})"


def stored_bytes(directory: Path) -> int:
  return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def iter_tree_paths(tree: Mapping, prefix: str = "") -> Iterable[str]:
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      yield from iter_tree_paths(value, path)
    else:
      yield path
