"""Model construction for training: preset + overrides -> config dataclass -> flax module, and back to JSON.

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
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvlm_jax import config as config_lib

DESCRIPTION_FORMAT = "nvlm_jax.model/1"
# variant -> (module, class) of the NVLM fusion models; X/H are written by other work streams.
FUSION_CLASSES = {"d": ("nvlm_jax.fusion.nvlm_d", "NVLMD"), "x": ("nvlm_jax.fusion.nvlm_x", "NVLMX"),
                  "h": ("nvlm_jax.fusion.nvlm_h", "NVLMH")}
# Which sub-config each remat key addresses (CausalLM: the config itself is the "llm").
TOWER_FIELDS = {"vision": "vision", "llm": "llm"}


def is_multimodal(model_config) -> bool:
  return isinstance(model_config, config_lib.NVLMConfig)


def module_for_config(model_config) -> nn.Module:
  """The flax module a config describes."""
  if isinstance(model_config, config_lib.DecoderConfig):
    from nvlm_jax.language.decoder import CausalLM
    return CausalLM(model_config)
  if is_multimodal(model_config):
    module_name, class_name = FUSION_CLASSES[model_config.variant]
    try:
      cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
      raise NotImplementedError(f"NVLM-{model_config.variant.upper()} model {module_name}.{class_name} "
                                f"is not available yet: {e}") from e
    return cls(model_config)
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
    from nvlm_jax import presets
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
  return {"format": DESCRIPTION_FORMAT, "config_class": type(model_config).__name__,
          "config": dataclasses.asdict(model_config)}


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
    raise ValueError(f"model description: {cls.__name__} has no fields {sorted(unknown)} "
                     "(checkpoint written by a newer nvlm_jax?)")
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
  kwargs = {"positions": jnp.zeros((batch_size, seq_len), jnp.int32),
            "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32)}
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
