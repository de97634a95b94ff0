"""The model registry: preset + overrides -> config dataclass -> flax module, and back to JSON.

A training config names the model by preset (`config.model.preset = "nvlm_d_72b"`, see nvlm_jax.presets)
or, for the text-only LM mode, spells out a DecoderConfig (`config.model.decoder = {...}`). On top come:
  model.dtype / model.param_dtype   compute and storage dtype of every tower (bf16 compute, fp32 master
                                    weights for training); "" keeps the preset's
  model.remat                       {"vision": policy, "llm": policy} remat policy per tower
                                    (nvlm_jax.layers.remat.POLICIES)
  model.overrides                   nested dict of any config field, e.g. {"llm": {"num_layers": 4}}

The module class follows from the config: DecoderConfig -> CausalLM, NVLMConfig(variant d/x/h) ->
NVLMD / NVLMX / NVLMH. `describe_model` / `model_from_description` turn a model into JSON and back, so a
checkpoint directory can rebuild its model without the training config.

`load_model(path)` is the one way to load a checkpoint, ours (a trainer workdir or `convert` output) or a
Hugging Face directory; `checkpoint_format(path)` is the one place that tells them apart. The readers sit
below the registry (nvlm_jax/checkpoint/: orbax_checkpoint.py, hf_import.py); building the module a
checkpoint describes happens here (`load_checkpoint`, `save_checkpoint` for ours).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvlm_jax import config as config_lib
from nvlm_jax import presets, sharding
from nvlm_jax.checkpoint import hf_import, orbax_checkpoint
from nvlm_jax.checkpoint.orbax_checkpoint import DESCRIPTION_FORMAT
from nvlm_jax.fusion.nvlm_d import NVLMD
from nvlm_jax.fusion.nvlm_h import NVLMH
from nvlm_jax.fusion.nvlm_x import NVLMX
from nvlm_jax.language.decoder import CausalLM

# variant -> the NVLM fusion model class.
FUSION_CLASSES = {"d": NVLMD, "x": NVLMX, "h": NVLMH}
# Which sub-config each remat key addresses (CausalLM: the config itself is the "llm").
TOWER_FIELDS = {"vision": "vision", "llm": "llm"}


def is_multimodal(model_config) -> bool:
  return isinstance(model_config, config_lib.NVLMConfig)


def module_for_config(model_config) -> nn.Module:
  """The flax module a config describes."""
  if isinstance(model_config, config_lib.DecoderConfig):
    return CausalLM(model_config)
  if is_multimodal(model_config):
    if model_config.variant not in FUSION_CLASSES:
      raise ValueError(f"NVLMConfig.variant {model_config.variant!r}; expected one of {sorted(FUSION_CLASSES)}")
    return FUSION_CLASSES[model_config.variant](model_config)
  raise TypeError(f"no model class for config type {type(model_config).__name__}")


def _replace_nested(cfg, changes: Mapping[str, Any], where: str = "model.overrides"):
  """dataclasses.replace, recursing into nested config dataclasses for dict values."""
  updates = {}
  names = {f.name for f in dataclasses.fields(cfg)}
  for key, value in changes.items():
    if key not in names:
      raise KeyError(f"{where}.{key}: {type(cfg).__name__} has no field {key!r}; fields: {sorted(names)}")
    current = getattr(cfg, key)
    if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
      updates[key] = _replace_nested(current, value, f"{where}.{key}")
    else:
      updates[key] = tuple(value) if isinstance(value, list) else value
  return dataclasses.replace(cfg, **updates)


def _set_everywhere(cfg, field: str, value):
  """Sets `field` on the config and on every nested config dataclass that has it."""
  updates = {}
  for f in dataclasses.fields(cfg):
    current = getattr(cfg, f.name)
    if dataclasses.is_dataclass(current):
      updates[f.name] = _set_everywhere(current, field, value)
    elif f.name == field:
      updates[f.name] = value
  return dataclasses.replace(cfg, **updates)


def _to_plain(value):
  """ml_collections ConfigDicts / FrozenConfigDicts -> plain dicts (recursively)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _to_plain(v) for k, v in value.items()}
  return value


def model_config_from_settings(model_settings) -> Any:
  """The config dataclass for `config.model` of a training config (see module docstring)."""
  preset = model_settings.get("preset", "")
  if preset:
    cfg = presets.get_preset(preset)
  elif model_settings.get("decoder"):
    cfg = config_lib.DecoderConfig(**_to_plain(model_settings.decoder))
  else:
    raise ValueError("config.model needs a `preset` name or a `decoder` dict (text-only LM)")
  return apply_settings(cfg, model_settings)


def apply_settings(cfg, model_settings):
  """dtype / param_dtype / remat / overrides of `config.model` applied to a model config dataclass."""
  if model_settings.get("dtype"):
    cfg = _set_everywhere(cfg, "dtype", model_settings.dtype)
  if model_settings.get("param_dtype"):
    cfg = _set_everywhere(cfg, "param_dtype", model_settings.param_dtype)
  for tower, policy in _to_plain(model_settings.get("remat", None) or {}).items():
    if not policy:
      continue
    if isinstance(cfg, config_lib.DecoderConfig):
      if tower == "llm":
        cfg = cfg.replace(remat_policy=policy)
      continue
    if tower not in TOWER_FIELDS or not hasattr(cfg, TOWER_FIELDS[tower]):
      raise KeyError(f"config.model.remat.{tower}: unknown tower; use one of {sorted(TOWER_FIELDS)}")
    sub = getattr(cfg, TOWER_FIELDS[tower])
    cfg = dataclasses.replace(cfg, **{TOWER_FIELDS[tower]: dataclasses.replace(sub, remat_policy=policy)})
  overrides = _to_plain(model_settings.get("overrides", None) or {})
  if overrides:
    cfg = _replace_nested(cfg, overrides)
  return cfg


# --- JSON description ------------------------------------------------------------------------------


def describe_model(model_config) -> dict:
  """A JSON-able description from which `model_from_description` rebuilds the same module."""
  return {
    "format": DESCRIPTION_FORMAT,
    "config_class": type(model_config).__name__,
    "config": dataclasses.asdict(model_config),
  }


def _from_dict(cls, data: Mapping[str, Any]):
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in data:
      continue  # a field added after the checkpoint was written keeps its default
    value = data[f.name]
    hint = hints.get(f.name)
    if isinstance(value, Mapping) and dataclasses.is_dataclass(hint):
      value = _from_dict(hint, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[f.name] = value
  unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(
      f"model description: {cls.__name__} has no fields {sorted(unknown)} (checkpoint written by a newer nvlm_jax?)"
    )
  return cls(**kwargs)


def config_from_description(description: Mapping[str, Any]):
  if description.get("format") != DESCRIPTION_FORMAT:
    raise ValueError(f"model description format {description.get('format')!r}, expected {DESCRIPTION_FORMAT!r}")
  name = description["config_class"]
  cls = getattr(config_lib, name, None)
  if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
    raise ValueError(f"model description names config class {name!r}, which nvlm_jax.config does not define")
  return _from_dict(cls, description["config"])


def model_from_description(description: Mapping[str, Any]) -> nn.Module:
  return module_for_config(config_from_description(description))


# --- initialization --------------------------------------------------------------------------------


def init_inputs(model_config, batch_size: int = 1, seq_len: int = 8, num_tiles: int | None = None):
  """(input_ids, kwargs) of zeros with the training-batch signature, for `model.init`."""
  ids = jnp.zeros((batch_size, seq_len), jnp.int32)
  kwargs = {
    "positions": jnp.zeros((batch_size, seq_len), jnp.int32),
    "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32),
  }
  if is_multimodal(model_config):
    v = model_config.vision
    tiles = num_tiles or 1
    kwargs["pixel_values"] = jnp.zeros((batch_size, tiles, v.image_size, v.image_size, v.num_channels), jnp.float32)
    kwargs["tile_mask"] = jnp.zeros((batch_size, tiles), bool)
  return ids, kwargs


def init_fn(model: nn.Module, model_config) -> Any:
  """rng -> boxed variables; shapes do not depend on the batch, so a [1, 8] dummy input suffices."""
  ids, kwargs = init_inputs(model_config)

  def init(rng):
    return model.init(rng, ids, **kwargs)

  return init


def abstract_variables(model: nn.Module, model_config) -> Any:
  """Boxed ShapeDtypeStructs of the model variables (no allocation)."""
  return jax.eval_shape(init_fn(model, model_config), jax.random.key(0))


# --- loading -----------------------------------------------------------------------------------------

OURS, HF = "nvlm_jax", "hf"


def checkpoint_format(path: str | os.PathLike) -> str | None:
  """OURS for a trainer workdir / checkpoints dir / step dir, HF for a directory with config.json, else None."""
  if orbax_checkpoint.is_training_checkpoint(path):
    return OURS
  if Path(path).is_dir() and (Path(path) / "config.json").is_file():
    return HF
  return None


def saved_dtype(path: str | os.PathLike) -> str:
  """The dtype a HF checkpoint was saved in (config.json `dtype` / `torch_dtype`), else float32."""
  try:
    config = json.loads((Path(path) / "config.json").read_text())
  except (OSError, json.JSONDecodeError):
    return "float32"
  name = config.get("dtype") or config.get("torch_dtype") or (config.get("llm_config") or {}).get("torch_dtype")
  return name if name in ("float32", "bfloat16", "float16") else "float32"


def load_model(
  path: str | os.PathLike,
  *,
  dtype: str | None = None,
  param_dtype: str | None = None,
  mesh=None,
  axis_rules=None,
  **hf_options,
) -> tuple[nn.Module, Any]:
  """(model, params) from one of our checkpoints or a Hugging Face checkpoint directory.

  dtype / param_dtype: compute / storage dtype names; default: as saved (ours: the saved model description;
  HF: config.json's `dtype` / `torch_dtype`). mesh: place every parameter directly on its sharding (logical
  axes through `axis_rules`, default nvlm_jax.sharding.LOGICAL_AXIS_RULES). hf_options go to
  `checkpoint.hf_import.load_hf_checkpoint` (scan_layers, rules, layout, config_overrides) and are ignored
  for our checkpoints, which keep their saved layout.
  """
  if not Path(path).exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  axis_rules = sharding.LOGICAL_AXIS_RULES if axis_rules is None else axis_rules
  if checkpoint_format(path) == OURS:
    return load_checkpoint(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype or dtype, rules=axis_rules)
  dtype = dtype or saved_dtype(path)
  return hf_import.load_hf_checkpoint(
    path, dtype=dtype, param_dtype=param_dtype or dtype, mesh=mesh, axis_rules=axis_rules, **hf_options
  )


def load_checkpoint(
  path: str | os.PathLike,
  *,
  step: int | None = None,
  mesh=None,
  dtype: str | None = None,
  param_dtype: str | None = None,
  rules=sharding.LOGICAL_AXIS_RULES,
) -> tuple[nn.Module, Any]:
  """(model, params) from one of our checkpoints (checkpoint/orbax_checkpoint.py; latest step unless `step`).

  dtype / param_dtype override the saved compute / storage dtypes (e.g. "bfloat16" to serve); with a
  `mesh`, every parameter is restored directly onto its NamedSharding, otherwise onto one device.
  """
  directory, step = orbax_checkpoint.resolve_step(path, step)
  model_config = saved_config = config_from_description(orbax_checkpoint.read_model_description(directory, step))
  if dtype:
    model_config = _set_everywhere(model_config, "dtype", dtype)
  if param_dtype:
    model_config = _set_everywhere(model_config, "param_dtype", param_dtype)
  model = module_for_config(model_config)
  boxed = abstract_variables(model, model_config)["params"]
  if mesh is not None:
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.meta.unbox(boxed))
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed), shardings
  )
  stored = lambda: nn.meta.unbox(abstract_variables(module_for_config(saved_config), saved_config)["params"])
  return model, orbax_checkpoint.restore_params(directory / str(step), target, stored)


def save_checkpoint(directory: str | os.PathLike, model_config, params: Mapping[str, Any], step: int = 0) -> Path:
  """Writes params + model description as one of our checkpoints with no train state (e.g. an init for
  `checkpoint.init_from`); `load_checkpoint` / `load_model` read it back. Returns the step directory."""
  return orbax_checkpoint.save_params(directory, describe_model(model_config), params, step)


def load_pretrained(
  path: str | os.PathLike,
  dtype=jnp.float32,
  *,
  param_dtype=None,
  mesh=None,
  axis_rules=sharding.LOGICAL_AXIS_RULES,
  **hf_options,
) -> tuple[nn.Module, Any]:
  """`nvlm_jax.load_pretrained`: a Hugging Face checkpoint directory or one of our own checkpoints.

  Our checkpoints (a trainer workdir, its `checkpoints/` dir, one `checkpoints/<step>` dir, or the output
  of `python -m nvlm_jax.convert import|stitch`) are restored with their saved model description;
  dtype / param_dtype / mesh apply to them too, the HF-only options (scan_layers, rules, layout,
  config_overrides; see `checkpoint.hf_import.load_hf_checkpoint`) do not. dtype: compute dtype (default
  float32, for either kind); param_dtype: storage dtype of the params (default: dtype).

  Returns (model, params): run it with `model.apply({"params": params}, input_ids)`.
  """
  name = jnp.dtype(dtype).name
  return load_model(
    path, dtype=name, param_dtype=jnp.dtype(param_dtype or dtype).name, mesh=mesh, axis_rules=axis_rules, **hf_options
  )
