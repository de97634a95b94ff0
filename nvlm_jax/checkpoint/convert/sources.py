"""Where converted parameters come from, one tensor (one layer slice) at a time.

A source knows its model config and yields `WorkItem`s; running an item reads what it needs
(memory-mapped safetensors, or orbax chunk rows), transforms it and returns (param path, layer, array)
pieces for `orbax_stream.ParamWriter`. Only the items in flight (importer.stream_into bounds
them) hold memory.

- `HFSource`: a Hugging Face safetensors directory, through the layout's RuleTable `to_flax` rules.
  Items run layer-major (all tensors of layer 0, then layer 1, ...), the order in which checkpoints are
  written, so reads move through the shards sequentially.
- `OrbaxSource`: one of our checkpoints (trainer-written or converted), read with `ParamReader`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from nvlm_jax import models
from nvlm_jax.checkpoint import hf_import, orbax_checkpoint, orbax_stream, vision_layouts
from nvlm_jax.checkpoint.convert.output import ConvertError
from nvlm_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from nvlm_jax.checkpoint.text_layouts import ConfigError

# Short names accepted by `--layout` -> registered import layouts (hf_import.REGISTRY).
LAYOUT_ALIASES = {
  "qwen2": "Qwen2ForCausalLM",
  "llama": "LlamaForCausalLM",
  "internvl": "InternVLForConditionalGeneration",
  "nvlm_d": "NVLM_D",
  "intern_vit": "InternVisionModel",
  "internvl_vision": "InternVLVisionModel",
}
DTYPES = ("auto", "bfloat16", "float32", "float16")

Piece = tuple[str, "int | None", np.ndarray]  # (param path, layer or None, array)


@dataclasses.dataclass
class WorkItem:
  """One unit of work: `run()` -> pieces to write; `label` names the source tensors for messages."""

  label: str
  nbytes: int
  run: Callable[[], list[Piece]]
  tensors: int = 1
  keys: tuple[str, ...] = ()  # the source tensors it reads (HF keys)


def resolve_layout(name: str, cfg_json: Mapping[str, Any], keys, source: str) -> hf_import.Layout:
  layouts = hf_import.registered_layouts()
  if name in (None, "", "auto"):
    return hf_import.detect_layout(cfg_json, keys, source)
  name = LAYOUT_ALIASES.get(name, name)
  if name not in layouts:
    raise ConfigError(
      f"unknown layout {name!r}; use 'auto', one of {sorted(LAYOUT_ALIASES)} or a registered layout {sorted(layouts)}"
    )
  return layouts[name]


def majority_dtype(ckpt: SafetensorsCheckpoint) -> str:
  """The floating dtype holding most of the checkpoint's bytes (what `--dtype auto` keeps)."""
  by_dtype: dict[str, int] = {}
  for info in ckpt.values():
    dt = info.np_dtype
    if np.issubdtype(dt, np.floating) or dt.name == "bfloat16":
      by_dtype[dt.name] = by_dtype.get(dt.name, 0) + (info.end - info.start)
  if not by_dtype:
    raise CheckpointError(f"{ckpt.path}: no floating-point tensors")
  name = max(by_dtype, key=by_dtype.get)
  return name if name in DTYPES else "float32"


class HFSource:
  """A Hugging Face checkpoint directory: validated headers, config, layout and rule table."""

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    layout: str = "auto",
    dtype: str = "auto",
    scan_layers: bool = True,
    config_overrides: Mapping[str, Any] | None = None,
  ):
    self.directory = Path(directory)
    if not self.directory.is_dir():
      raise ConvertError(f"{self.directory}: not a directory")
    self.cfg_json, self.cfg_file = hf_import.read_config(self.directory)
    self.ckpt = SafetensorsCheckpoint(self.directory)  # validates every shard header and the index
    self.layout = resolve_layout(layout, self.cfg_json, self.ckpt.keys(), str(self.cfg_file))
    if dtype not in DTYPES:
      raise ConvertError(f"--dtype {dtype!r}; expected one of {DTYPES}")
    self.dtype = majority_dtype(self.ckpt) if dtype == "auto" else dtype
    self.config = self.layout.build_config(
      self.cfg_json,
      source=str(self.cfg_file),
      dtype=self.dtype,
      param_dtype=self.dtype,
      scan_layers=scan_layers,
      **dict(config_overrides or {}),
    )
    self.table = vision_layouts.layout_rules(self.layout, self.config, self.ckpt)
    self.table.check_checkpoint(self.ckpt)  # unknown / missing keys, wrong shapes: before any read

  def build_model(self):
    return self.layout.build_model(self.config)

  def abstract_params(self):
    """Boxed ShapeDtypeStructs of the model params (logical axes included); allocates nothing."""
    return hf_import.abstract_params(self.build_model(), self.layout.init_args(self.config))

  @property
  def nbytes(self) -> int:
    return sum(self.ckpt[k].end - self.ckpt[k].start for k in self.table.hf_shapes())

  def items(self, param_prefix: str = "") -> Iterator[WorkItem]:
    """Layer-major work items; param paths get `param_prefix/` (for stitching into a bigger model)."""
    join = (lambda p: f"{param_prefix.rstrip('/')}/{p}") if param_prefix else (lambda p: p)
    global_rules = [r for r in self.table.rules if r.num_layers is None]
    layered = [r for r in self.table.rules if r.num_layers is not None]
    order = [(r, None) for r in global_rules]
    depth = max((r.num_layers for r in layered), default=0)
    order += [(r, layer) for layer in range(depth) for r in layered if layer < r.num_layers]
    for rule, layer in order:
      keys = rule.keys_at(layer)
      nbytes = sum(self.ckpt[k].end - self.ckpt[k].start for k in keys)
      yield WorkItem(
        label=", ".join(keys),
        nbytes=nbytes,
        tensors=len(keys),
        keys=tuple(keys),
        run=self._runner(rule, layer, keys, join),
      )

  def _runner(self, rule, layer, keys, join):
    def run() -> list[Piece]:
      outs = rule.to_flax(*(self.ckpt.read(k) for k in keys))
      pieces = []
      for path, stacked, out, shape in zip(rule.paths_at(layer), rule.stacked_paths, outs, rule.param_shapes):
        if tuple(out.shape) != tuple(shape):
          raise CheckpointError(f"rule for {keys} produced {path} with shape {out.shape}, expected {shape}")
        if rule.scan:
          pieces.append((join(stacked), layer, out))
        else:
          pieces.append((join(path), None, out))
      return pieces

    return run


class OrbaxSource:
  """One of our orbax checkpoints (a workdir, its checkpoints/ dir or one step dir)."""

  def __init__(self, path: str | os.PathLike, step: int | None = None):

    try:
      directory, self.step = orbax_checkpoint.resolve_step(path, step)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
      raise ConvertError(str(e)) from None
    self.step_dir = directory / str(self.step)
    self.workdir = directory.parent if directory.name == orbax_checkpoint.CHECKPOINT_SUBDIR else directory
    try:
      self.description = orbax_checkpoint.read_model_description(directory, self.step)
      self.config = models.config_from_description(self.description)
    except (FileNotFoundError, ValueError, TypeError) as e:
      raise ConvertError(f"{self.step_dir}: cannot read the model description ({e})") from None
    self.reader = orbax_stream.ParamReader(self.step_dir / orbax_stream.PARAMS_ITEM)

  def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Stored param shapes; with `prefix`, only that subtree, re-rooted."""
    out = {}
    cut = prefix.rstrip("/") + "/" if prefix else ""
    for path, info in self.reader.arrays.items():
      if path.startswith(cut):
        out[path[len(cut) :]] = info.shape
    return out

  def items(self, *, source_prefix: str = "", param_prefix: str = "") -> Iterator[WorkItem]:
    """Copies every stored param under `source_prefix` to `param_prefix` + its relative path; the
    params of scanned layers (a `layers` path segment, as CausalLM and InternViT name them) layer by
    layer."""
    cut = source_prefix.rstrip("/") + "/" if source_prefix else ""
    join = (lambda p: f"{param_prefix.rstrip('/')}/{p}") if param_prefix else (lambda p: p)
    for path, info in self.reader.arrays.items():
      if not path.startswith(cut):
        continue
      target = join(path[len(cut) :])
      if is_scanned_path(path) and info.shape:
        per_layer = info.nbytes // max(1, info.shape[0])
        for layer in range(info.shape[0]):
          yield WorkItem(
            label=f"{path}[{layer}]", nbytes=per_layer, tensors=int(layer == 0), run=self._runner(path, target, layer)
          )
      else:
        yield WorkItem(label=path, nbytes=info.nbytes, run=self._runner(path, target, None))

  def _runner(self, path, target, layer):
    def run() -> list[Piece]:
      array = self.reader.read(path, layer)
      if layer is not None and layer == self.reader.arrays[path].shape[0] - 1:
        self.reader.release(path)
      return [(target, layer, array)]

    return run


def is_scanned_path(path: str) -> bool:
  """A param of scanned layers, stacked on axis 0 (`decoder/layers/...`, `encoder/layers/...`)."""
  return "layers" in path.split("/")


def open_source(path: str | os.PathLike, **hf_kwargs):
  """HFSource for a Hugging Face directory, OrbaxSource for one of ours."""

  kind = models.checkpoint_format(path)
  if kind == models.OURS:
    return OrbaxSource(path)
  if kind == models.HF:
    return HFSource(path, **hf_kwargs)
  raise ConvertError(
    f"{path}: neither a Hugging Face checkpoint directory (config.json + safetensors) nor an "
    "nvlm_jax checkpoint (checkpoints/<step>/params)"
  )
