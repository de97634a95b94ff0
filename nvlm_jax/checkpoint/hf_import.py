"""`load_hf_checkpoint` (behind `nvlm_jax.load_pretrained`): a Hugging Face checkpoint directory -> (flax model, params).

The directory's config.json picks a `Layout` from `REGISTRY` (by `architectures`, or by anything the
layout's detector looks at, such as the checkpoint's key names). A layout bundles everything one
checkpoint format needs: a detector, a config builder, a model builder, a rule table builder and the
example inputs its `init` takes. Adding a format is one `register_layout(Layout(...))` call.

Weights are read one tensor at a time and placed straight onto their final sharding when a mesh is
given (shardings come from the model's logical axis names via `jax.eval_shape`, so the randomly
initialised model is never materialised).

Adding a layout (e.g. NVLM-D-72B: `vision_model.*`, `mlp1.*`, `language_model.*`):

    register_layout(Layout(
        name="NVLM_D",
        detect=lambda cfg, keys: "NVLM_D" in (cfg.get("architectures") or [])
                                 and any(k.startswith("vision_model.") for k in keys),
        build_config=nvlm_d_config_from_hf,   # (cfg, *, source, dtype, param_dtype, scan_layers, **kw)
        build_model=NVLMD,
        build_rules=lambda c: intern_vit_rules(c.vision, prefix="vision_model.", param_prefix="vision")
                              + mlp1_rules(c, param_prefix="projector")
                              + decoder_rules(c.text, prefix="language_model.model.",
                                              lm_head_key="language_model.lm_head.weight",
                                              param_prefix="language_model"),
        init_args=lambda c: (jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 1, 448, 448, 3))),
    ))

where the text part of build_config is `decoder_config_from_hf(cfg["llm_config"], source=f"{file}:llm_config")`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvlm_jax.checkpoint.mapping import RuleTable
from nvlm_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from nvlm_jax.checkpoint.text_layouts import (
  ConfigError,
  check_attention_biases,
  decoder_config_from_hf,
  llama_rules,
  qwen2_rules,
)
from nvlm_jax.config import DecoderConfig
from nvlm_jax.language.decoder import CausalLM
from nvlm_jax.sharding import LOGICAL_AXIS_RULES, logical_to_sharding

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Everything needed to import one checkpoint format.

  detect(config_json, checkpoint_keys) -> bool: does this directory hold this format?
  build_config(config_json, *, source, dtype, param_dtype, scan_layers, **overrides) -> model config
    (source is the config file path for error messages; dtypes are names such as "bfloat16").
  build_model(model_config) -> flax module.
  build_rules(model_config) -> RuleTable mapping the files' keys to the module's params.
  init_args(model_config) -> example positional inputs for `module.init` (only shapes matter).
  """

  name: str
  detect: Callable[[Mapping[str, Any], Collection[str]], bool]
  build_config: Callable[..., Any]
  build_model: Callable[[Any], nn.Module]
  build_rules: Callable[[Any], RuleTable]
  init_args: Callable[[Any], tuple]


REGISTRY: dict[str, Layout] = {}

# Modules that register more layouts when imported. Imported on first use (not here: they import this
# module, and they pull in model code that a text-only import does not need).
LAYOUT_MODULES: tuple[str, ...] = ("nvlm_jax.checkpoint.vision_layouts",)


def register_layout(layout: Layout) -> Layout:
  REGISTRY[layout.name] = layout
  return layout


def registered_layouts() -> dict[str, Layout]:
  """REGISTRY after importing every module in LAYOUT_MODULES that exists."""
  for module in LAYOUT_MODULES:
    if module not in sys.modules and importlib.util.find_spec(module) is not None:
      importlib.import_module(module)
  return REGISTRY


def architectures_detector(*names: str, model_type: str | None = None):
  """Detects by config.json `architectures`; a config without it falls back to `model_type`."""

  def detect(cfg: Mapping[str, Any], keys: Collection[str]) -> bool:
    archs = cfg.get("architectures") or []
    if archs:
      return any(a in names for a in archs)
    return model_type is not None and cfg.get("model_type") == model_type

  return detect


def _causal_lm_layout(arch: str, model_type: str, rules_fn) -> Layout:

  return Layout(
    name=arch,
    detect=architectures_detector(arch, model_type=model_type),
    build_config=decoder_config_from_hf,
    build_model=CausalLM,
    build_rules=rules_fn,
    init_args=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
  )


register_layout(_causal_lm_layout("Qwen2ForCausalLM", "qwen2", qwen2_rules))
register_layout(_causal_lm_layout("LlamaForCausalLM", "llama", llama_rules))


def read_config(path: str | Path) -> tuple[dict, Path]:
  """config.json of a checkpoint directory -> (dict, its path)."""
  file = Path(path) / CONFIG_FILE
  if not file.is_file():
    raise ConfigError(f"{file}: not found (a Hugging Face checkpoint directory needs {CONFIG_FILE})")
  try:
    cfg = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file}: invalid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise ConfigError(f"{file}: must hold a JSON object")
  return cfg, file


def detect_layout(cfg: Mapping[str, Any], keys: Collection[str], source: str = CONFIG_FILE) -> Layout:
  """The one registered layout whose detector accepts this config and these checkpoint keys."""
  layouts = registered_layouts()
  found = [layout for layout in layouts.values() if layout.detect(cfg, keys)]
  if len(found) == 1:
    return found[0]
  what = f"field 'architectures' is {cfg.get('architectures')!r} (model_type {cfg.get('model_type')!r})"
  if not found:
    raise ConfigError(f"{source}: {what}; no registered layout matches. Known layouts: {sorted(REGISTRY)}")
  raise ConfigError(f"{source}: {what}; several layouts match: {[layout.name for layout in found]}")


def abstract_params(model: nn.Module, init_args: tuple) -> Any:
  """The model's boxed param tree as ShapeDtypeStructs (no allocation)."""
  init = lambda: model.init(jax.random.key(0), *init_args)
  return jax.eval_shape(init)["params"]


def load_hf_checkpoint(
  path: str | Path,
  dtype: str = "float32",
  *,
  param_dtype: str | None = None,
  scan_layers: bool = True,
  mesh: jax.sharding.Mesh | None = None,
  rules: RuleTable | Callable[[Any], RuleTable] | None = None,
  layout: str | None = None,
  axis_rules=LOGICAL_AXIS_RULES,
  config_overrides: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict]:
  """Loads a Hugging Face safetensors checkpoint directory (use `nvlm_jax.load_pretrained`, which also takes ours).

  dtype: compute dtype; param_dtype: storage dtype of the params (default: dtype). Each tensor is
  converted from its file dtype (e.g. bf16) as it is read. scan_layers: stack layer params for nn.scan.
  mesh: place every param directly on its NamedSharding (from the model's logical axes and
  `axis_rules`); without it params land on the default device. rules: a RuleTable (or a function of
  the model config returning one) replacing the layout's own. layout: a REGISTRY name, skipping
  detection. config_overrides: extra model-config fields (e.g. {"remat_policy": "full"}).
  """
  path = Path(path)
  cfg_json, cfg_file = read_config(path)
  ckpt = SafetensorsCheckpoint(path)
  if layout is None:
    chosen = detect_layout(cfg_json, ckpt.keys(), str(cfg_file))
  elif layout in registered_layouts():
    chosen = REGISTRY[layout]
  else:
    raise ConfigError(f"unknown layout {layout!r}; known layouts: {sorted(REGISTRY)}")
  param_dtype = dtype if param_dtype is None else param_dtype
  model_cfg = chosen.build_config(
    cfg_json,
    source=str(cfg_file),
    dtype=jnp.dtype(dtype).name,
    param_dtype=jnp.dtype(param_dtype).name,
    scan_layers=scan_layers,
    **dict(config_overrides or {}),
  )
  decoder_cfg = getattr(model_cfg, "llm", model_cfg)
  if isinstance(decoder_cfg, DecoderConfig):
    check_attention_biases(decoder_cfg, ckpt.keys(), str(cfg_file))
  model = chosen.build_model(model_cfg)
  table = rules(model_cfg) if callable(rules) else rules
  if table is None:  # NVLM-D: the ViT heads as the files store them (padded as released, or not)
    from nvlm_jax.checkpoint.vision_layouts import layout_rules  # vision_layouts imports this module

    table = layout_rules(chosen, model_cfg, ckpt)

  boxed = abstract_params(model, chosen.init_args(model_cfg))
  shapes = nn.meta.unbox(boxed)
  shardings = None if mesh is None else logical_to_sharding(nn.get_partition_spec(boxed), mesh, axis_rules)
  flat_shapes = _flatten(shapes)
  flat_shardings = {} if shardings is None else _flatten(shardings)
  target = {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_shardings.get(p)) for p, s in flat_shapes.items()}
  params = table.to_flax(ckpt, target=target)
  return model, params


def _flatten(tree) -> dict:
  from flax import traverse_util

  return traverse_util.flatten_dict(tree, sep="/")


__all__ = [
  "CheckpointError",
  "ConfigError",
  "Layout",
  "REGISTRY",
  "LAYOUT_MODULES",
  "register_layout",
  "registered_layouts",
  "architectures_detector",
  "detect_layout",
  "read_config",
  "abstract_params",
  "load_hf_checkpoint",
]
