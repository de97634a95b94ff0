"""`convert export`: one of our orbax checkpoints -> sharded safetensors + config.json for PyTorch / vLLM.

    python -m nvlm_jax.convert export --checkpoint runs/sft --out hf/nvlm_d --layout nvlm_d --pad-dummy-heads

Layouts: `qwen2`, `llama` (a text model, or the language model of an NVLM checkpoint), `internvl`
(transformers InternVLForConditionalGeneration: its projector has biases and hidden width = LLM width),
`nvlm_d` (nvidia/NVLM-D-72B names: `vision_model.*` with fused qkv, `mlp1.*`, `language_model.*`;
`--pad-dummy-heads` pads the ViT heads with zero heads to a multiple of 8, as the release stores them
and vLLM's NVLM-D loader expects: 25 -> 32).

The rule table's `to_hf` direction produces one HF tensor at a time from params read one layer slice at
a time; each shard's header is written first and the tensors streamed in, so memory stays at about one
tensor. The written config.json is parsed back with our importer and must give the same model config.
The tokenizer files of the checkpoint's workdir (the trainer keeps them in WORKDIR/tokenizer/; the chat
template is in tokenizer_config.json) are copied along, and for NVLM layouts the processor settings the run
trained with (WORKDIR/processor.json) go into config.json under "nvlm_jax", where
`Processor.from_pretrained` reads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nvlm_jax.checkpoint import hf_import, vision_layouts
from nvlm_jax.checkpoint.convert import configs as convert_configs
from nvlm_jax.checkpoint.convert.output import (
  PROVENANCE_FILE,
  ConvertError,
  Progress,
  atomic_output_dir,
  copy_side_files,
  parse_size,
  refuse_existing,
)
from nvlm_jax.checkpoint.convert.shards import ShardedWriter, TensorEntry
from nvlm_jax.checkpoint.convert.sources import OrbaxSource
from nvlm_jax.checkpoint.mapping import RuleTable
from nvlm_jax.checkpoint.text_layouts import decoder_rules
from nvlm_jax.config import DecoderConfig, NVLMConfig
from nvlm_jax.data.processor_setup import PROCESSOR_FILE

EXPORT_LAYOUTS = ("qwen2", "llama", "internvl", "nvlm_d")
EXPORT_DTYPES = ("auto", "bfloat16", "float32", "float16")
# Config fields that are implementation or training switches, not part of any HF config.
_IMPLEMENTATION_FIELDS = {"dtype", "param_dtype", "scan_layers", "remat_policy", "freeze_vision", "debug_checks"}
# Processing settings a layout's config.json cannot carry (the importer fills in defaults): a warning.
_UNREPRESENTED = {"internvl": {"max_tiles", "use_thumbnail"}}


@dataclasses.dataclass(frozen=True)
class ExportPlan:
  """What one export writes: the rule table, the config.json, and how to re-read that config."""

  layout: str
  table: RuleTable
  param_prefix: str  # subtree of the checkpoint the table reads ("" = all)
  model_config: Any  # the config the written files must reproduce
  config_json: dict
  import_layout: str  # hf_import.REGISTRY name that reads the files back
  num_dummy_heads: int = 0


def _llm_of(cfg, layout: str) -> tuple[DecoderConfig, str]:
  if isinstance(cfg, DecoderConfig):
    return cfg, ""
  if isinstance(cfg, NVLMConfig):
    if cfg.variant != "d" and cfg.llm.scan_layers:
      raise ConvertError(
        f"--layout {layout}: the language model of an NVLM-{cfg.variant.upper()} checkpoint has its "
        "layers regrouped around the cross-attention blocks; exporting it alone is not supported"
      )
    return cfg.llm, "language_model"
  raise ConvertError(f"--layout {layout}: the checkpoint holds a {type(cfg).__name__}, not a language model")


def plan_export(cfg, layout: str, dtype: str, *, pad_dummy_heads: bool = False) -> ExportPlan:
  """Checks that `cfg` fits `layout` and builds the table and config.json (no I/O)."""

  if layout not in EXPORT_LAYOUTS:
    raise ConvertError(f"--layout {layout!r}; expected one of {EXPORT_LAYOUTS}")
  if pad_dummy_heads and layout != "nvlm_d":
    raise ConvertError(f"--pad-dummy-heads applies to --layout nvlm_d only (got --layout {layout})")
  if layout in ("qwen2", "llama"):
    llm, prefix = _llm_of(cfg, layout)
    if layout == "qwen2" and not llm.qkv_bias:
      raise ConvertError("--layout qwen2: this language model has no q/k/v biases (Llama-style); use --layout llama")
    if layout == "llama" and llm.qkv_bias:
      raise ConvertError("--layout llama: this language model has q/k/v biases (Qwen2-style); use --layout qwen2")
    name = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[layout]
    return ExportPlan(
      layout, decoder_rules(llm, name=name), prefix, llm, convert_configs.decoder_config_json(llm, layout, dtype), name
    )
  if not isinstance(cfg, NVLMConfig) or cfg.variant != "d":
    what = type(cfg).__name__ if not isinstance(cfg, NVLMConfig) else f"NVLM-{cfg.variant.upper()} model"
    raise ConvertError(f"--layout {layout}: needs an NVLM-D model, the checkpoint holds a {what}")
  p = cfg.projector
  if layout == "internvl":
    if not (p.num_layers == 2 and p.use_bias and p.hidden_size == p.out_features):
      raise ConvertError(
        f"--layout internvl: transformers' InternVL projector is Linear({p.in_features}, D) + bias -> "
        f"Linear(D, D) + bias with D = the LLM width; this model's projector has num_layers={p.num_layers}, "
        f"use_bias={p.use_bias}, hidden_size={p.hidden_size} (NVLM-D's mlp1): use --layout nvlm_d"
      )
    return ExportPlan(
      layout,
      vision_layouts.internvl_hf_rules(cfg),
      "",
      cfg,
      convert_configs.internvl_config_json(cfg, dtype),
      "InternVLForConditionalGeneration",
    )
  # nvlm_d
  if p.num_layers != 2:
    raise ConvertError(f"--layout nvlm_d: mlp1 has two linear layers; this projector has {p.num_layers}")
  if not cfg.llm.qkv_bias:
    raise ConvertError("--layout nvlm_d: the NVLM-D layout's language model is Qwen2 (q/k/v biases); this one has none")
  heads = cfg.vision.num_heads
  stored = vision_layouts.nvlm_d_stored_heads(heads) if pad_dummy_heads else heads
  return ExportPlan(
    layout,
    vision_layouts.nvlm_d_rules(cfg, stored_heads=stored),
    "",
    cfg,
    convert_configs.nvlm_d_config_json(cfg, dtype, stored - heads),
    "NVLM_D",
    stored - heads,
  )


def _plain(cfg) -> dict:
  def strip(d):
    return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _IMPLEMENTATION_FIELDS}

  return strip(dataclasses.asdict(cfg))


def _differences(ours: dict, theirs: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
  out = []
  for key in sorted(set(ours) | set(theirs)):
    a, b = ours.get(key), theirs.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{prefix}{key}.")
    elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
      out.append((f"{prefix}{key}", a, b))
  return out


def check_config_round_trip(plan: ExportPlan, directory: Path) -> list[str]:
  """Parses the written config.json with our importer; raises on any architecture difference, returns
  warnings for processing settings the layout cannot carry."""
  layout = hf_import.registered_layouts()[plan.import_layout]
  cfg_json, cfg_file = hf_import.read_config(directory)
  scan = getattr(plan.model_config, "scan_layers", None)
  scan = plan.model_config.llm.scan_layers if scan is None else scan
  parsed = layout.build_config(cfg_json, source=str(cfg_file), dtype="float32", param_dtype="float32", scan_layers=scan)
  diffs = _differences(_plain(plan.model_config), _plain(parsed))
  soft = _UNREPRESENTED.get(plan.layout, set())
  hard = [d for d in diffs if d[0] not in soft]
  if hard:
    lines = "\n  ".join(f"{name}: model has {a!r}, the written config.json gives {b!r}" for name, a, b in hard)
    raise ConvertError(
      f"--layout {plan.layout} cannot represent this model (re-reading {cfg_file.name} gives a "
      f"different model):\n  {lines}"
    )
  return [
    f"{name}: the {plan.layout} layout cannot record it; readers will use {b!r} (model has {a!r})"
    for name, a, b in diffs
    if name in soft
  ]


def _entries(plan: ExportPlan, stored_dtypes: Mapping[str, np.dtype], out_dtype) -> list[TensorEntry]:
  entries = []
  for rule in plan.table.rules:
    paths = rule.stacked_paths if rule.scan else None
    for layer in rule.layers:
      params = paths if paths is not None else rule.paths_at(layer)
      dtype = np.dtype(out_dtype) if out_dtype is not None else np.result_type(*(stored_dtypes[p] for p in params))
      entries += [TensorEntry(k, tuple(s), np.dtype(dtype)) for k, s in zip(rule.keys_at(layer), rule.hf_shapes)]
  return entries


def _training_processor_settings(workdir: Path) -> dict:
  """The Processor arguments a training run saved (WORKDIR/processor.json), without its tokenizer path."""

  file = Path(workdir) / PROCESSOR_FILE
  if not file.is_file():
    return {}
  try:
    settings = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ConvertError(f"{file}: not valid JSON ({e})") from None
  settings.pop("tokenizer", None)
  return settings


def export_checkpoint(
  checkpoint: str | os.PathLike,
  out: str | os.PathLike,
  *,
  layout: str,
  max_shard_size: str | int = "5GB",
  pad_dummy_heads: bool = False,
  dtype: str = "auto",
  step: int | None = None,
  progress: bool = True,
) -> dict:
  """Writes `checkpoint` (a workdir / step dir of ours) as a Hugging Face directory at `out`."""
  start = time.perf_counter()
  out = refuse_existing(out)
  if dtype not in EXPORT_DTYPES:
    raise ConvertError(f"--dtype {dtype!r}; expected one of {EXPORT_DTYPES}")
  max_shard_bytes = parse_size(max_shard_size)
  source = OrbaxSource(checkpoint, step)
  out_dtype = None if dtype == "auto" else jnp.dtype(dtype)
  # The config's dtype field: the export dtype, or what most of the stored bytes are.
  by_dtype: dict[str, int] = {}
  for a in source.reader.arrays.values():
    by_dtype[a.dtype.name] = by_dtype.get(a.dtype.name, 0) + a.nbytes
  config_dtype = dtype if dtype != "auto" else max(by_dtype, key=by_dtype.get)
  plan = plan_export(source.config, layout, config_dtype, pad_dummy_heads=pad_dummy_heads)
  lazy = traverse_util.flatten_dict(source.reader.lazy_tree(plan.param_prefix), sep="/")
  plan.table.check_target({p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in lazy.items()})
  entries = _entries(plan, {p: v.dtype for p, v in lazy.items()}, out_dtype)

  config_json = dict(plan.config_json)
  processor = _training_processor_settings(source.workdir)
  if processor and layout in ("internvl", "nvlm_d"):
    config_json["nvlm_jax"] = processor

  with atomic_output_dir(out) as tmp:
    (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    side_files = copy_side_files(source.workdir, tmp)
    notes = check_config_round_trip(plan, tmp)
    for note in notes:
      warnings.warn(note, stacklevel=2)
    bar = Progress(sum(e.nbytes for e in entries), len(entries), desc=f"export {out.name}", enabled=progress)
    try:
      with ShardedWriter(tmp, entries, max_shard_bytes) as writer:
        for key, array in plan.table.to_hf(traverse_util.unflatten_dict(lazy, sep="/"), dtype=out_dtype):
          writer.write(key, array)
          bar.update(array.nbytes)
        writer.close()
    finally:
      bar.close()
    summary = {
      "command": "export",
      "source": str(source.step_dir),
      "layout": layout,
      "dtype": config_dtype,
      "tensors": len(entries),
      "shards": len(writer.files),
      "bytes": writer.bytes_written,
      "num_dummy_heads": plan.num_dummy_heads,
      "side_files": side_files,
      "processor_settings": config_json.get("nvlm_jax", {}),
      "notes": notes,
      "seconds": round(time.perf_counter() - start, 3),
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  summary["out"] = str(out)
  return summary
