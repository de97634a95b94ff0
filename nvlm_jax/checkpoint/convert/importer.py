"""`convert import`: a Hugging Face safetensors checkpoint -> one of our orbax checkpoints, streamed.

    python -m nvlm_jax.convert import --hf-dir /ckpt/NVLM-D-72B --out /ckpt/nvlm_d_72b_jax --mesh fsdp=8

Reads one tensor at a time (memory-mapped), converts it with the layout's rules (transposes, the
fused-qkv split, dummy-head slicing), casts it to the storage dtype and writes it straight into the
checkpoint (a stacked [layers, ...] param one layer slice at a time). Host memory stays at about one
tensor plus the bounded in-flight writes, whatever the checkpoint size; nothing is placed on devices.
The result lands under a temporary name and is renamed to `--out` only when complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from nvlm_jax import models
from nvlm_jax.checkpoint import orbax_stream
from nvlm_jax.checkpoint.convert.output import (
  PROVENANCE_FILE,
  ConvertError,
  Progress,
  atomic_output_dir,
  copy_side_files,
  refuse_existing,
)
from nvlm_jax.checkpoint.convert.sources import HFSource, WorkItem
from nvlm_jax.sharding import parse_mesh as parse_mesh_text

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def stream_into(
  writer: orbax_stream.ParamWriter,
  items: Iterable[WorkItem],
  bar: Progress,
  *,
  workers: int = DEFAULT_WORKERS,
  budget: int | None = None,
) -> None:
  """Runs the work items (read + transform) on `workers` threads ahead of the writes, and writes
  their pieces in order.

  numpy copies and TensorStore's encoding release the GIL, so transforming the next tensors overlaps
  with writing this one. Memory bound: the source bytes of the items in flight plus the writer's
  uncommitted bytes stay within `budget` (default: the writer's in-flight bound); an item larger
  than that runs alone, after the writes before it have committed. So the peak is about
  max(largest tensor x 2, budget) plus a constant, whatever the checkpoint size.
  """
  budget = writer.inflight_bytes if budget is None else budget
  items = iter(items)
  queue: collections.deque = collections.deque()
  queued = 0
  upcoming = next(items, None)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="convert") as pool:
    try:
      while upcoming is not None or queue:
        while upcoming is not None and len(queue) < max(1, workers):
          if queue and queued + writer.pending_bytes + upcoming.nbytes > budget:
            break
          if not queue:
            writer.wait(max(0, budget - upcoming.nbytes))
          queue.append((upcoming, pool.submit(upcoming.run)))
          queued += upcoming.nbytes
          upcoming = next(items, None)
        item, future = queue.popleft()
        pieces = future.result()
        queued -= item.nbytes
        for path, layer, array in pieces:
          writer.write(path, array, layer)
        del pieces
        bar.update(item.nbytes, item.tensors)
    except BaseException:
      for _, future in queue:
        future.cancel()
      raise


def is_float_dtype(dtype) -> bool:
  dtype = np.dtype(dtype)
  return bool(np.issubdtype(dtype, np.floating)) or dtype.name == "bfloat16"


def check_float_tensors(source: HFSource) -> None:
  """Refuses a source tensor whose dtype kind cannot hold a parameter: every parameter is floating-point,
  and casting an integer or bool tensor to float would write numbers that were never weights."""
  for key in source.table.hf_shapes():
    dtype = source.ckpt[key].np_dtype
    if not is_float_dtype(dtype):
      raise ConvertError(
        f"{source.directory / source.ckpt.file_of(key)}: tensor {key!r} is {np.dtype(dtype).name}, "
        "but it feeds a floating-point parameter; refusing to cast it (is the file damaged, or "
        "from another model?)"
      )


def write_provenance(directory: Path, record: Mapping[str, Any]) -> None:
  (directory / PROVENANCE_FILE).write_text(json.dumps(dict(record), indent=2, sort_keys=True) + "\n")


def parse_mesh(text: str | None) -> dict[str, int] | None:
  """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2} (every size given: the chunks follow the shard boundaries)."""
  if not text:
    return None
  try:
    return parse_mesh_text(text, allow_rest=False)
  except ValueError as e:
    raise ConvertError(str(e)) from None


def import_checkpoint(
  hf_dir: str | os.PathLike,
  out: str | os.PathLike,
  *,
  dtype: str = "auto",
  mesh: Mapping[str, int] | str | None = None,
  layout: str = "auto",
  scan_layers: bool = True,
  compression: str = "zstd",
  progress: bool = True,
  max_chunk_bytes: int = orbax_stream.DEFAULT_MAX_CHUNK_BYTES,
  inflight_bytes: int = orbax_stream.DEFAULT_INFLIGHT_BYTES,
) -> dict:
  """Converts `hf_dir` into an orbax checkpoint at `out`; returns a summary dict.

  dtype: storage (and compute) dtype of the params, 'auto' = the checkpoint's own floating dtype.
  mesh: the mesh the checkpoint will be restored onto (chunks are cut at its shard boundaries).
  Everything is validated (headers, keys, shapes, dtype kinds, config) before the output directory is created.
  """
  start = time.perf_counter()
  out = refuse_existing(out)
  mesh = parse_mesh(mesh) if isinstance(mesh, str) else mesh
  source = HFSource(hf_dir, layout=layout, dtype=dtype, scan_layers=scan_layers)
  check_float_tensors(source)
  boxed = source.abstract_params()
  flat = traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/")
  source.table.check_target(flat)
  specs = orbax_stream.param_specs(boxed, source.dtype, mesh_shape=mesh, max_chunk_bytes=max_chunk_bytes)

  description = models.describe_model(source.config)
  with atomic_output_dir(out) as tmp:
    params_dir = orbax_stream.start_checkpoint(tmp, description)
    bar = Progress(
      source.nbytes, len(source.table.hf_shapes()), desc=f"import {source.directory.name}", enabled=progress
    )
    try:
      with orbax_stream.ParamWriter(
        params_dir, specs, compression=compression, inflight_bytes=inflight_bytes
      ) as writer:
        stream_into(writer, source.items(), bar)
        writer.close()
    finally:
      bar.close()
    orbax_stream.register_params_item(params_dir)
    side_files = copy_side_files(source.directory, tmp)
    summary = {
      "command": "import",
      "source": str(source.directory),
      "layout": source.layout.name,
      "model_config": type(source.config).__name__,
      "dtype": source.dtype,
      "mesh": mesh or {},
      "compression": compression,
      "tensors": len(source.table.hf_shapes()),
      "params": len(specs),
      "source_bytes": source.nbytes,
      "written_bytes": writer.bytes_written,
      "stored_bytes": orbax_stream.stored_bytes(params_dir),
      "side_files": side_files,
      "largest_tensor_bytes": max(source.ckpt[k].end - source.ckpt[k].start for k in source.table.hf_shapes()),
    }
    summary["seconds"] = round(time.perf_counter() - start, 3)
    write_provenance(tmp, summary)
  summary["out"] = str(out)
  return summary
