"""The training input pipeline: a blend of record sources -> packed, fixed-shape training batches (grain).

    BlendedSource(sources, weights)                                   records (records.py), random access
      -> MapDataset.source .seed(seed) .shuffle() .repeat()           a new order every epoch
      -> [process_index::process_count]                               this process's disjoint shard
      -> .map(EncodeRecord)                                           decode, tile, tokenize, shift (encode.py);
                                                                      bad samples become skip markers
      -> .to_iter_dataset(ReadOptions(read_threads))                  threads, in order
      -> .mp_prefetch(worker_count)                                   optional worker processes
      -> PackedBatchIterDataset                                       count + skip, pack, pad, batch (packing.py)
      -> ThreadPrefetchIterDataset(batch_prefetch)                    overlap with the train step
      -> TrainIterator                                                .stats(); optional global jax.Arrays

The trainer calls one factory, :func:`make_train_iterator`, and gets a grain ``DatasetIterator`` of THIS
process's rows of each global batch in the training-batch contract (nvlm_jax/training/batch.py). It
checkpoints with ``grain.checkpoint.CheckpointSave/Restore`` (inside an orbax ``Composite``) and resumes at
exactly the next batch, counters included.

Data config (an ``ml_collections.ConfigDict`` or a dict; factory keyword arguments win)::

    sources:            [{"kind": "synthetic" | "llava" | "array_record", "weight": w, "name": ..., ...}, ...]
        synthetic:      num_samples, seed, size ("tiny" | "paper"), any SyntheticSource argument
                        (tile_size / max_tiles default to the processor's, so tile answers match the tiles)
        llava:          path (a .json / .jsonl file), image_root (default: the file's directory)
        array_record:   path (the --out dir of tfds_builder or a builder dir), split ("train"), dataset_name
    global_batch_size   rows per step over all processes (8)
    seq_len             tokens per row (512)
    max_tiles           tile slots per row (default: the processor's max tiles per sample, e.g. 6 + 1 = 7);
                        0 = a text-only pipeline (samples with images are skipped as too_long)
    pack                "all" | "text_only" | "none" (packing.py)
    tile_budget         max real tiles per GLOBAL batch, split evenly over processes (0 = no limit);
                        mirrors the model's ViT tile_budget (vision/pathway.py)
    worker_count        grain worker processes for the map step (0 = in this process)
    worker_buffer_size  examples buffered per worker (2)
    read_threads        threads for the map step, per process (2)
    read_buffer_size    examples read ahead per process (16)
    batch_prefetch      batches prepared ahead in a thread (2; 0 = off)
    shuffle             global shuffle, a new order per epoch (True)
    num_epochs          0 = repeat forever (training); N = stop after N passes (the last batch is padded)
    epoch_samples       blend elements per epoch (0 = the sources' total length)
    blend_block_size    blend granularity (blend.py; 1024)
    tile_degradation    "12:8,8:6,6:4,4:2,2:1,1:1" (the authors' map; encode.py)
    max_text_chars, max_images   optional limits (0 = none) checked before any decoding
    max_consecutive_skips        this many skipped samples in a row raise instead of looping forever

Counters (``iterator.stats()``): samples per source, skipped samples by reason and by source, tile-degraded
samples, emitted rows/tokens/loss tokens/tiles. See stats.py for why they are exact with any number of
workers and across checkpoint/resume.
"""

from __future__ import annotations

import atexit
import copy
import logging
import weakref
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from nvlm_jax.data.blend import BlendedSource
from nvlm_jax.data.encode import EncodeRecord
from nvlm_jax.data.llava import LlavaSource
from nvlm_jax.data.packing import PackedBatchIterDataset
from nvlm_jax.data.stats import summarize
from nvlm_jax.data.synthetic import SyntheticSource

log = logging.getLogger("nvlm_jax.data")

SOURCE_KINDS = ("synthetic", "llava", "array_record")
DEFAULTS: dict[str, Any] = {
  "global_batch_size": 8,
  "seq_len": 512,
  "max_tiles": -1,  # -1: the processor's max tiles per sample
  "pack": "all",
  "tile_budget": 0,
  "worker_count": 0,
  "worker_buffer_size": 2,
  "read_threads": 2,
  "read_buffer_size": 16,
  "batch_prefetch": 2,
  "shuffle": True,
  "num_epochs": 0,
  "epoch_samples": 0,
  "blend_block_size": 1024,
  "tile_degradation": "",
  "max_text_chars": 0,
  "max_images": 0,
  "max_consecutive_skips": 10_000,
}


def _get(config: Any, key: str, default: Any = None) -> Any:
  value = config.get(key, None) if config is not None else None
  return default if value is None else value


def _option(config: Any, key: str) -> Any:
  return _get(config, key, DEFAULTS[key])


# ---- sources -------------------------------------------------------------------------------------------
def make_source(spec: Mapping, processor=None):
  """One random-access record source from its config entry (see the module docstring)."""
  try:
    return _make_source(dict(spec), processor)
  except TypeError as e:  # an unknown or missing argument for the source's constructor
    raise ValueError(f"data source {dict(spec)}: {e}") from e


def _make_source(spec: dict, processor):
  kind = spec.pop("kind", None)
  spec.pop("weight", None)
  if kind == "synthetic":
    num_samples = spec.pop("num_samples", 10_000)
    seed = spec.pop("seed", 0)
    if processor is not None:  # the tile questions are only right for the tiles the model sees
      spec.setdefault("tile_size", processor.image_size)
      spec.setdefault("max_tiles", processor.max_tiles_per_image)
    return SyntheticSource(num_samples, seed, **spec)
  if kind == "llava":
    if not spec.get("path"):
      raise ValueError(f"{_source_label(spec, kind)}: 'path' is empty; fill it in (a .json or .jsonl file)")
    return LlavaSource(spec.pop("path"), spec.pop("image_root", None) or None, **spec)  # "": beside the file
  if kind == "array_record":
    from nvlm_jax.data.tfds_builder import ArrayRecordSource  # tensorflow_datasets loads only for ArrayRecord sources

    if not spec.get("path"):
      raise ValueError(f"{_source_label(spec, kind)}: 'path' is empty; fill it in (the tfds_builder --out dir)")
    return ArrayRecordSource(spec.pop("path"), spec.pop("split", "train"), **spec)
  raise ValueError(f"data source kind {kind!r} in {spec}; expected one of {SOURCE_KINDS}")


def _source_label(spec: Mapping, kind: str) -> str:
  name = spec.get("name")
  return f"data source {name!r} ({kind})" if name else f"{kind} source {dict(spec)}"


def make_blend(data_config: Any, processor=None, *, seed: int = 0) -> BlendedSource:
  """The weighted blend of ``data_config.sources`` (names made unique: ``name``, ``name_1``, ...).

  ``sources`` is a list of source settings, or a mapping name -> settings (configs/sft_blend.py, whose paths are
  set on the command line by name); a source of weight 0 is left out unopened."""
  specs = _get(data_config, "sources", [])
  if hasattr(specs, "to_dict"):
    specs = specs.to_dict()
  if isinstance(specs, Mapping):
    specs = [
      {**dict(spec), "name": spec.get("name") or name}
      for name, spec in specs.items()
      if float(spec.get("weight", 1.0)) != 0
    ]
  specs = list(specs)
  if not specs:
    raise ValueError(
      "data config has no 'sources'; e.g. sources=[{'kind': 'synthetic', 'weight': 1.0, "
      "'num_samples': 1000}] (see nvlm_jax/data/pipeline.py)"
    )
  sources, weights, names = [], [], []
  for k, spec in enumerate(specs):
    if not isinstance(spec, Mapping):
      raise ValueError(f"data config sources[{k}] is a {type(spec).__name__}, expected a mapping")
    source = make_source(spec, processor)
    name = str(spec.get("name") or getattr(source, "name", None) or f"source_{k}")
    base, n = name, 1
    while name in names:
      name, n = f"{base}_{n}", n + 1
    sources.append(source)
    weights.append(float(spec.get("weight", 1.0)))
    names.append(name)
  epoch = int(_option(data_config, "epoch_samples")) or None
  return BlendedSource(
    sources,
    weights,
    seed=seed,
    num_samples=epoch,
    names=names,
    block_size=int(_option(data_config, "blend_block_size")),
  )


# ---- the map step -----------------------------------------------------------------------------------
def make_encoder(data_config: Any, processor, *, seq_len: int, max_tiles: int, keep_text: bool = False) -> EncodeRecord:
  return EncodeRecord(
    processor,
    seq_len=seq_len,
    max_tiles=max_tiles,
    degradation=_option(data_config, "tile_degradation") or None,
    max_text_chars=int(_option(data_config, "max_text_chars")) or None,
    max_images=int(_option(data_config, "max_images")) or None,
    keep_text=keep_text,
  )


def make_example_dataset(
  data_config: Any,
  processor,
  *,
  seq_len: int,
  max_tiles: int,
  process_index: int = 0,
  process_count: int = 1,
  seed: int = 0,
  blend: BlendedSource | None = None,
  keep_text: bool = False,
) -> grain.MapDataset:
  """``MapDataset`` of this process's examples / skip markers (encode.py), before packing."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  blend = blend if blend is not None else make_blend(data_config, processor, seed=seed)
  ds = grain.MapDataset.source(blend).seed(int(seed))
  if _option(data_config, "shuffle"):
    ds = ds.shuffle()
  epochs = int(_option(data_config, "num_epochs"))
  ds = ds.repeat(epochs if epochs > 0 else None)
  ds = ds[process_index::process_count]
  return ds.map(make_encoder(data_config, processor, seq_len=seq_len, max_tiles=max_tiles, keep_text=keep_text))


# ---- the whole pipeline ---------------------------------------------------------------------------------
def resolve_shapes(
  data_config: Any, processor, *, global_batch_size=None, seq_len=None, max_tiles=None, process_count: int = 1
) -> tuple[int, int, int, int]:
  """(global batch, local batch, seq_len, max_tiles) from the arguments, else the config, else defaults."""
  global_batch_size = int(global_batch_size or _option(data_config, "global_batch_size"))
  seq_len = int(seq_len or _option(data_config, "seq_len"))
  if max_tiles is None:
    max_tiles = int(_option(data_config, "max_tiles"))
  if max_tiles < 0:
    max_tiles = processor.max_tiles_per_sample
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
  return global_batch_size, global_batch_size // process_count, seq_len, int(max_tiles)


def make_train_dataset(
  data_config: Any,
  processor,
  *,
  global_batch_size: int | None = None,
  seq_len: int | None = None,
  max_tiles: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  seed: int = 0,
  worker_count: int | None = None,
  include_sample_ids: bool = False,
) -> grain.IterDataset:
  """``IterDataset`` of this process's batches (numpy, the training-batch contract)."""
  if processor is None:
    raise ValueError(
      "the data pipeline needs a Processor (tokenizer + image settings); build one with "
      "nvlm_jax.processing.Processor(...) or Processor.from_pretrained(dir) and pass it"
    )
  _, local_batch, seq_len, max_tiles = resolve_shapes(
    data_config,
    processor,
    global_batch_size=global_batch_size,
    seq_len=seq_len,
    max_tiles=max_tiles,
    process_count=process_count,
  )
  if 0 < max_tiles < processor.max_tiles_per_sample:
    log.warning(
      "max_tiles=%d tile slots per row < the processor's %d tiles per sample: larger samples will "
      "be tile-degraded to fit",
      max_tiles,
      processor.max_tiles_per_sample,
    )
  blend = make_blend(data_config, processor, seed=seed)
  examples = make_example_dataset(
    data_config,
    processor,
    seq_len=seq_len,
    max_tiles=max_tiles,
    process_index=process_index,
    process_count=process_count,
    seed=seed,
    blend=blend,
  )
  ds = examples.to_iter_dataset(
    grain.ReadOptions(
      num_threads=int(_option(data_config, "read_threads")),
      prefetch_buffer_size=int(_option(data_config, "read_buffer_size")),
    )
  )
  workers = int(_option(data_config, "worker_count") if worker_count is None else worker_count)
  if workers > 0:
    _allow_grain_workers_outside_app_run()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(_option(data_config, "worker_buffer_size"))
      )
    )
  budget = int(_option(data_config, "tile_budget"))
  local_budget = budget // process_count if budget else 0
  ds = PackedBatchIterDataset(
    ds,
    batch_size=local_batch,
    seq_len=seq_len,
    max_tiles=max_tiles,
    tile_size=processor.image_size,
    pad_id=processor.tokenizer.pad_id,
    source_names=blend.names,
    pack=str(_option(data_config, "pack")),
    tile_budget=local_budget,
    drop_remainder=False,
    include_sample_ids=include_sample_ids,
    worker_count=workers,
    max_consecutive_skips=int(_option(data_config, "max_consecutive_skips")),
  )
  prefetch = int(_option(data_config, "batch_prefetch"))
  if prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


def make_train_iterator(
  data_config: Any,
  processor=None,
  mesh=None,
  *,
  global_batch_size: int | None = None,
  seq_len: int | None = None,
  max_tiles: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  seed: int = 0,
  global_arrays: bool = False,
  worker_count: int | None = None,
  model_config=None,
  include_sample_ids: bool = False,
) -> "TrainIterator":
  """THE factory the trainer calls: a checkpointable iterator of this process's training batches.

  Sizes not given here come from ``data_config`` (``global_batch_size``, ``seq_len``, ``max_tiles``).
  Each ``next()`` returns this process's ``global_batch_size // process_count`` rows as numpy arrays;
  with ``global_arrays=True`` (needs ``mesh``) it returns global ``jax.Array``s instead, the batch dimension
  sharded over the mesh's batch axes ('data', 'fsdp'), built with ``jax.make_array_from_process_local_data``.
  ``mesh`` alone only checks that the global batch divides over those axes. ``model_config`` (an
  NVLMConfig), if given, is checked against the processor (image size, tokens per tile, placeholder id).
  ``include_sample_ids`` adds a ``sample_ids`` list per row (debugging; not part of the batch contract).
  """
  if processor is not None and model_config is not None:
    check_processor_matches_model(processor, model_config)
  gbs = (
    resolve_shapes(
      data_config,
      processor,
      global_batch_size=global_batch_size,
      seq_len=seq_len,
      max_tiles=max_tiles,
      process_count=process_count,
    )[0]
    if processor is not None
    else None
  )
  if mesh is not None and gbs is not None:
    ways = batch_ways(mesh)
    if gbs % ways:
      raise ValueError(
        f"global_batch_size={gbs} is not divisible by the mesh's batch axes {BATCH_MESH_AXES} = {ways} devices"
      )
  if global_arrays and mesh is None:
    raise ValueError("global_arrays=True needs a mesh")
  dataset = make_train_dataset(
    data_config,
    processor,
    global_batch_size=global_batch_size,
    seq_len=seq_len,
    max_tiles=max_tiles,
    process_index=process_index,
    process_count=process_count,
    seed=seed,
    worker_count=worker_count,
    include_sample_ids=include_sample_ids,
  )
  return TrainIterator(iter(dataset), mesh=mesh if global_arrays else None, process_count=process_count)


# ---- the iterator the trainer holds --------------------------------------------------------------------
BATCH_MESH_AXES = ("data", "fsdp")


def batch_ways(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_MESH_AXES if a in mesh.shape]))


class TrainIterator(grain.DatasetIterator):
  """Batches from the pipeline, plus ``stats()``; optionally as global jax.Arrays on ``mesh``.

  Its state is the pipeline's (a JSON dict), so ``grain.checkpoint.CheckpointSave(it)`` /
  ``CheckpointRestore(it)`` work inside an orbax ``Composite`` and resume at exactly the next batch.
  """

  def __init__(self, parent: grain.DatasetIterator, *, mesh=None, process_count: int = 1):
    super().__init__(parent)
    self.mesh, self.process_count = mesh, process_count
    atexit.register(_close_at_exit, weakref.ref(self))

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    batch = next(self._parent)
    return self._to_global(batch) if self.mesh is not None else batch

  def get_state(self) -> dict[str, Any]:
    return copy.deepcopy(self._parent.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def stats(self) -> dict[str, Any]:
    """Counters as of the last batch returned (stats.py): exact, checkpointed with the state."""
    return copy.deepcopy(self._parent.get_state()["stats"])

  def summary(self, **kwargs) -> str:
    return summarize(self.stats(), **kwargs)

  def _to_global(self, batch: dict[str, Any]) -> dict[str, Any]:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    axes = tuple(a for a in BATCH_MESH_AXES if a in self.mesh.shape)
    out = {}
    for key, value in batch.items():
      if not isinstance(value, np.ndarray):
        out[key] = value  # e.g. sample_ids
        continue
      sharding = NamedSharding(self.mesh, P(axes, *([None] * (value.ndim - 1))))
      global_shape = (value.shape[0] * self.process_count,) + value.shape[1:]
      out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def _close_at_exit(ref: weakref.ref) -> None:
  """Closes an iterator still open at interpreter exit (its worker processes, their shared memory) and lets
  its pipeline be collected now: left to garbage collection during shutdown, grain's __del__ methods run
  with half-torn-down modules and print tracebacks and "leaked shared_memory" warnings."""
  it = ref()
  if it is not None:
    it.close()
    it._parents = ()  # noqa: SLF001 - drops the last reference to the closed grain pipeline


def check_processor_matches_model(processor, model_config) -> None:
  """Raises if the processor's image text would not line up with the model's image tokens."""
  problems = []
  token_id = getattr(model_config, "image_token_id", None)
  if token_id is not None and processor.image_context_id != token_id:
    problems.append(
      f"image placeholder id: processor {processor.image_context_id} "
      f"({processor.image_context_token!r}) vs model image_token_id {token_id}"
    )
  vision = getattr(model_config, "vision", None)
  if vision is not None and processor.image_size != vision.image_size:
    problems.append(f"tile size: processor {processor.image_size} vs model vision.image_size {vision.image_size}")
  tokens = getattr(model_config, "tokens_per_tile", None)
  if tokens is not None and processor.tokens_per_tile != tokens:
    problems.append(f"tokens per tile: processor {processor.tokens_per_tile} vs model {tokens}")
  if problems:
    raise ValueError("processor and model disagree: " + "; ".join(problems))


def _allow_grain_workers_outside_app_run() -> None:
  """grain's worker processes read absl flags; outside ``absl.app.run`` they are not parsed yet."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ---- demo config ------------------------------------------------------------------------------------
SYNTHETIC_SETTINGS = {
  # tiny: 56-224 px images, 56 px tiles (16 tokens each with the tiny ViT); paper: 448-1344 px, 448 px tiles,
  # NVLM-D SFT decoder length 3,200 and 6 + 1 tiles (docs/paper.md (g), Table 11).
  "tiny": {"seq_len": 256, "max_tiles": 7, "global_batch_size": 8, "num_samples": 100_000},
  "paper": {"seq_len": 3200, "max_tiles": 7, "global_batch_size": 128, "num_samples": 1_000_000},
}


def default_synthetic_data_config(size: str = "tiny"):
  """A data config (ml_collections.ConfigDict) over the built-in synthetic set, for the demo and tests.

  Pair it with a Processor whose image size matches (tiny: 56 px tiles, patch 7; paper: 448 px, patch 14).
  """
  import ml_collections

  if size not in SYNTHETIC_SETTINGS:
    raise ValueError(f"unknown synthetic size {size!r}; expected one of {sorted(SYNTHETIC_SETTINGS)}")
  s = SYNTHETIC_SETTINGS[size]
  config = {k: v for k, v in DEFAULTS.items()}
  config.update(
    kind="nvlm_pipeline",
    global_batch_size=s["global_batch_size"],
    seq_len=s["seq_len"],
    max_tiles=s["max_tiles"],
    num_microbatches=1,
    sources=[
      {
        "kind": "synthetic",
        "weight": 1.0,
        "num_samples": s["num_samples"],
        "seed": 0,
        "size": size,
        "text_only_fraction": 0.2,
      }
    ],
  )
  return ml_collections.ConfigDict(config)
