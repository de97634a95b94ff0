"""`convert inspect PATH`: what is in a checkpoint, and how its tensors map onto our parameters.

For a Hugging Face directory (or a single .safetensors file): every tensor's shape, dtype and shard
(per-layer keys folded into one `{layer}` line unless --all), the detected layout and the rule table:
which HF key(s) become which param path(s), with which transform. For one of our orbax checkpoints:
the model description, every stored param (shape, dtype, chunk shape) and the mapping to the HF layout
`export` would use by default. Only headers and metadata are read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nvlm_jax import models
from nvlm_jax.checkpoint import hf_import
from nvlm_jax.checkpoint.convert.export import plan_export
from nvlm_jax.checkpoint.convert.output import ConvertError
from nvlm_jax.checkpoint.convert.sources import HFSource, OrbaxSource
from nvlm_jax.checkpoint.mapping import Rule, RuleTable
from nvlm_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from nvlm_jax.checkpoint.vision_layouts import intern_vit_rules
from nvlm_jax.config import DecoderConfig, NVLMConfig, VisionConfig

# What each rule factory does to the tensor, keyed by the factory that built the rule's `to_flax`.
_TRANSFORMS = {
  "rename": "copy",
  "linear": "transpose torch Linear [out, in] -> kernel [in, out], reshape to the param",
  "bias": "reshape",
  "reshaped": "reshape",
  "conv_patch": "permute torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out]",
  "_fused_qkv_rule": "split fused [Q | K | V] rows into q/k/v (transpose); zero dummy heads checked and dropped",
  "_padded_vector_rule": "drop the zero dummy-head tail, reshape to [heads, head_dim]",
  "_padded_proj_rule": "drop the zero dummy-head columns, transpose to [heads, head_dim, D]",
}
_LAYER_RE = re.compile(r"(?<=\blayers[./])\d+(?=[./])|(?<=\blayer[./])\d+(?=[./])")


def _factory(fn) -> str:
  name = getattr(fn, "__qualname__", "").split(".")[0]
  if name == "_one" and getattr(fn, "__closure__", None):  # mapping._one(fn) wraps a one-output fn
    inner = fn.__closure__[0].cell_contents
    name = getattr(inner, "__qualname__", name).split(".")[0]
  return name


def describe_transform(rule: Rule) -> str:
  """A human description of a rule's HF -> param transform (from the factory that built it)."""
  name = _factory(rule.to_flax)
  if name in _TRANSFORMS:
    return _TRANSFORMS[name]
  if len(rule.hf_keys) == 1 and len(rule.param_paths) > 1:
    return f"split into {len(rule.param_paths)} params ({name})"
  return f"{name or 'custom'} transform"


def mapping_rows(table: RuleTable) -> list[dict[str, Any]]:
  rows = []
  for rule in table.rules:
    stacked = rule.scan
    paths = rule.stacked_paths if stacked else rule.param_paths
    shapes = [((rule.num_layers,) if stacked else ()) + tuple(s) for s in rule.param_shapes]
    rows.append(
      {
        "hf_keys": list(rule.hf_keys),
        "hf_shapes": [list(s) for s in rule.hf_shapes],
        "params": list(paths),
        "param_shapes": [list(s) for s in shapes],
        "layers": rule.num_layers,
        "stacked": stacked,
        "transform": describe_transform(rule),
      }
    )
  return rows


def _fold(rows: list[tuple[str, str, str]], fold: bool) -> list[str]:
  """(name, shape/dtype, file) -> lines; with fold, the keys of all layers as one `{layer}` line."""
  if not fold:
    return [f"{n}  {info}  {file}" for n, info, file in rows]
  groups: dict[tuple[str, str], tuple[int, set]] = {}
  for name, info, file in rows:
    key = (_LAYER_RE.sub("{layer}", name), info)
    count, files = groups.get(key, (0, set()))
    groups[key] = (count + 1, files | {file})
  lines = []
  for (name, info), (count, files) in groups.items():
    where = next(iter(files)) if len(files) == 1 else f"{len(files)} files"
    lines.append(f"{name}  {info}  {where}" + (f"  x{count}" if count > 1 else ""))
  return lines


def _human(nbytes: int) -> str:
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if nbytes >= size:
      return f"{nbytes / size:.2f} {unit}"
  return f"{nbytes} B"


def inspect_hf(path: Path, layout: str = "auto") -> dict[str, Any]:

  ckpt = SafetensorsCheckpoint(path)
  report: dict[str, Any] = {
    "kind": "huggingface",
    "path": str(path),
    "files": sorted({info.file.name for info in ckpt.values()}),
    "tensors": [{"key": k, "shape": list(i.shape), "dtype": i.dtype, "file": i.file.name} for k, i in ckpt.items()],
    "total_bytes": sum(i.end - i.start for i in ckpt.values()),
  }
  if path.is_dir() and (path / hf_import.CONFIG_FILE).is_file():
    try:
      source = HFSource(path, layout=layout, dtype="float32")
    except (CheckpointError, ValueError) as e:
      report["layout_error"] = str(e)
    else:
      report["layout"] = source.layout.name
      report["model_config"] = type(source.config).__name__
      report["mapping"] = mapping_rows(source.table)
      expected = source.table.hf_shapes()
      report["ignored_keys"] = [k for k in ckpt if k not in expected]
  return report


def inspect_orbax(path: Path) -> dict[str, Any]:

  source = OrbaxSource(path)
  arrays = source.reader.arrays
  report: dict[str, Any] = {
    "kind": "orbax",
    "path": str(source.step_dir),
    "step": source.step,
    "config_class": type(source.config).__name__,
    "description": source.description,
    "params": [
      {"path": p, "shape": list(a.shape), "dtype": a.dtype.name, "chunks": list(a.chunks)}
      for p, a in sorted(arrays.items())
    ],
    "total_bytes": sum(a.nbytes for a in arrays.values()),
  }
  cfg = source.config
  layout = None
  if isinstance(cfg, DecoderConfig):
    layout = "qwen2" if cfg.qkv_bias else "llama"
  elif isinstance(cfg, NVLMConfig) and cfg.variant == "d":
    layout = (
      "internvl" if cfg.projector.use_bias and cfg.projector.hidden_size == cfg.projector.out_features else "nvlm_d"
    )
  if layout is not None:
    try:
      plan = plan_export(cfg, layout, "float32")
      report["export_layout"] = layout
      report["mapping"] = mapping_rows(plan.table)
    except ConvertError as e:
      report["layout_error"] = str(e)
  elif isinstance(cfg, VisionConfig):
    report["export_layout"] = "intern_vit (InternVisionModel names)"
    report["mapping"] = mapping_rows(intern_vit_rules(cfg))
  return report


def inspect_path(path: str | os.PathLike, layout: str = "auto") -> dict[str, Any]:
  path = Path(path)
  if not path.exists():
    raise ConvertError(f"{path}: does not exist")
  if models.checkpoint_format(path) == models.OURS:
    return inspect_orbax(path)
  return inspect_hf(path, layout)


def format_report(report: dict[str, Any], show_all: bool = False) -> str:
  size = _human(report["total_bytes"])
  lines = []
  if report["kind"] == "huggingface":
    dtypes = sorted({t["dtype"] for t in report["tensors"]})
    lines.append(
      f"Hugging Face checkpoint {report['path']}: {len(report['files'])} file(s), "
      f"{len(report['tensors'])} tensors, {size}, dtypes {', '.join(dtypes)}"
    )
    lines.append("tensors (key  shape dtype file):")
    rows = sorted((t["key"], f"{t['shape']} {t['dtype']}", t["file"]) for t in report["tensors"])
    lines += ["  " + line for line in _fold(rows, not show_all)]
    if "layout" in report:
      lines.append(f"layout: {report['layout']} -> {report['model_config']}")
    if report.get("layout_error"):
      lines.append(f"layout: none ({report['layout_error']})")
    if report.get("ignored_keys"):
      lines.append(f"ignored keys (not loaded): {report['ignored_keys']}")
  else:
    desc = report["description"]
    lines.append(
      f"nvlm_jax checkpoint {report['path']} (step {report['step']}): {report['config_class']}, "
      f"{len(report['params'])} params, {size}"
    )
    lines.append(f"config: {desc.get('config')}")
    lines.append("params (path  shape dtype chunks):")
    lines += [f"  {p['path']}  {p['shape']} {p['dtype']} chunks {p['chunks']}" for p in report["params"]]
    if report.get("export_layout"):
      lines.append(f"default export layout: {report['export_layout']}")
    if report.get("layout_error"):
      lines.append(f"export layout: none ({report['layout_error']})")
  if report.get("mapping"):
    lines.append("mapping (HF key(s) [shape] -> param path(s) [shape]: transform):")
    for row in report["mapping"]:
      left = ", ".join(f"{k} {s}" for k, s in zip(row["hf_keys"], row["hf_shapes"]))
      right = ", ".join(f"{p} {s}" for p, s in zip(row["params"], row["param_shapes"]))
      layers = ""
      if row["layers"]:
        layers = f"  [x{row['layers']} layers, {'stacked on axis 0' if row['stacked'] else 'one param per layer'}]"
      lines.append(f"  {left} -> {right}: {row['transform']}{layers}")
  return "\n".join(lines)
