"""HF Qwen2 / Llama causal-LM checkpoints: config.json -> DecoderConfig, and the weight rule table.

`Qwen2ForCausalLM` / `LlamaForCausalLM` files hold `model.{embed_tokens,layers.N.*,norm}.weight` and
`lm_head.weight` (absent when the embeddings are tied). The multimodal layouts (transformers InternVL,
NVLM-D-72B) hold the same tensors under `language_model.`; build them with
`decoder_rules(cfg, prefix="language_model.model.", lm_head_key="language_model.lm_head.weight",
param_prefix="language_model")`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

from nvlm_jax.checkpoint.mapping import RuleTable, bias, linear, per_layer, rename
from nvlm_jax.config import DecoderConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
# The decoder family each architecture name builds (transformers builds the class `architectures[0]` names
# whatever `model_type` says; NVLM-D-72B's llm_config says model_type 'llama' for a Qwen2ForCausalLM).
ARCHITECTURE_FAMILIES = {
  "Qwen2ForCausalLM": "qwen2",
  "Qwen2Model": "qwen2",
  "LlamaForCausalLM": "llama",
  "LlamaModel": "llama",
}
# The RopeScaling fields each rope_type reads from a config (rope_type / rope_theta are read separately).
ROPE_TYPE_FIELDS = {
  "default": (),
  "linear": ("factor",),
  "dynamic": ("factor",),
  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
  "yarn": (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
  ),
}


class ConfigError(ValueError):
  """A config.json we cannot turn into a model config; names the file and the field."""


# ----------------------------------------------------------------------------------------------------
# config.json -> DecoderConfig


def _model_type(cfg: Mapping[str, Any], source: str) -> str:
  """The decoder family: from `architectures` when it names one we know, else from `model_type`."""
  archs = cfg.get("architectures") or []
  for arch in archs:
    if arch in ARCHITECTURE_FAMILIES:
      return ARCHITECTURE_FAMILIES[arch]
  model_type = cfg.get("model_type")
  if model_type is None:  # infer from an architecture name we do not list when a hand-written config omits it
    names = " ".join(archs)
    model_type = "qwen2" if "Qwen2" in names else "llama" if "Llama" in names else None
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(
      f"{source}: field 'model_type' is {cfg.get('model_type')!r} "
      f"(architectures {cfg.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}"
    )
  return model_type


def _rope_dict(cfg: Mapping[str, Any], source: str) -> tuple[str, Mapping[str, Any]]:
  """(field name, the one RoPE dict): `rope_scaling` wins over `rope_parameters`, as in transformers;
  a dict per layer type must hold the same RoPE for every type."""
  field = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
  params = cfg.get(field) or {}
  if not isinstance(params, Mapping):
    raise ConfigError(f"{source}: field {field!r} must be an object, found {params!r}")
  layer_types = set(cfg.get("layer_types") or ())
  if params and layer_types and set(params) <= layer_types:  # one dict per layer type
    distinct = {json.dumps(p or {}, sort_keys=True) for p in params.values()}
    if len(distinct) != 1:
      raise ConfigError(
        f"{source}: field {field!r} gives different RoPE per layer type ({dict(params)}); "
        "only one RoPE for all layers is supported"
      )
    params = next(iter(params.values())) or {}
  return field, params


def rope_from_hf(
  cfg: Mapping[str, Any], source: str = "config.json", default_theta: float = 10_000.0
) -> tuple[float, RopeScaling]:
  """(RoPE base, RopeScaling) from any transformers config.json vintage.

  transformers 5 writes `"rope_parameters": {"rope_theta": ..., "rope_type": ..., ...}` (possibly one dict
  per layer type); older files write top-level `rope_theta` and `rope_scaling` (null or {"type" or
  "rope_type": ..., "factor": ...}). As in transformers, `rope_scaling` wins over `rope_parameters`, a
  theta inside the dict wins over the top-level one, and 10000 is the default. Scaling types other than
  default / linear / dynamic / llama3 / yarn are refused, naming the field.
  """
  field, params = _rope_dict(cfg, source)
  rope_type = params.get("rope_type", params.get("type", "default")) or "default"
  if rope_type not in ROPE_TYPE_FIELDS:
    raise ConfigError(
      f"{source}: field {field!r} asks for RoPE scaling type {rope_type!r} ({dict(params)}); "
      f"implemented: {tuple(ROPE_TYPE_FIELDS)}"
    )
  partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1.0, 1):
    raise ConfigError(f"{source}: field 'partial_rotary_factor' is {partial}; only full rotary (1.0) is implemented")
  theta = params.get("rope_theta", cfg.get("rope_theta", default_theta))
  if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
    raise ConfigError(f"{source}: field 'rope_theta' must be a positive number, found {theta!r}")
  values = {name: params[name] for name in ROPE_TYPE_FIELDS[rope_type] if params.get(name) is not None}
  if rope_type in ("llama3", "yarn") and cfg.get("original_max_position_embeddings") is not None:
    # Phi-3-style configs keep it at the top level; transformers then prefers it to the dict's
    values["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
  try:
    scaling = RopeScaling(rope_type=rope_type, **values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{source}: field {field!r} ({dict(params)}): {e}") from None
  return float(theta), scaling


def _require(cfg: Mapping[str, Any], field: str, source: str, kind=int):
  if field not in cfg or cfg[field] is None:
    raise ConfigError(f"{source}: required field {field!r} is missing")
  value = cfg[field]
  if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
    raise ConfigError(f"{source}: field {field!r} must be a positive integer, found {value!r}")
  return value


def _token_id(cfg: Mapping[str, Any], field: str, source: str):
  value = cfg.get(field)
  if isinstance(value, list):
    value = tuple(value)
    if len(value) == 1 and field != "eos_token_id":
      value = value[0]
  if value is not None and not (
    isinstance(value, int) or (isinstance(value, tuple) and all(isinstance(v, int) for v in value))
  ):
    raise ConfigError(f"{source}: field {field!r} must be a token id, found {cfg.get(field)!r}")
  return value


def decoder_config_from_hf(
  config_json: Mapping[str, Any], *, source: str = "config.json", **overrides
) -> DecoderConfig:
  """A Qwen2Config / LlamaConfig dict (config.json, or an InternVL `text_config` / NVLM `llm_config`)
  -> DecoderConfig. `overrides` set DecoderConfig fields (scan_layers, dtype, remat_policy, ...).

  The family (q/k/v biases or none) comes from `architectures` when it names Qwen2 or Llama, else from
  `model_type`. Refuses what DecoderConfig cannot represent (RoPE scaling types other than those of
  RopeScaling, sliding windows, o_proj / MLP biases,
  activations other than SiLU) instead of loading a model that computes something else.
  """
  cfg = config_json
  model_type = _model_type(cfg, source)
  act = cfg.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ConfigError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is implemented")
  if model_type == "qwen2":
    qkv_bias = True  # Qwen2 always has q/k/v biases and never an o_proj bias (its `attention_bias` means q/k/v)
    if cfg.get("use_sliding_window"):
      raise ConfigError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not implemented")
  else:
    qkv_bias = bool(cfg.get("attention_bias", False))
    if qkv_bias:
      raise ConfigError(
        f"{source}: field 'attention_bias' is true; Llama then also has an o_proj bias, "
        "which DecoderConfig cannot represent"
      )
    if cfg.get("mlp_bias"):
      raise ConfigError(f"{source}: field 'mlp_bias' is true; MLP biases are not implemented")
  heads = _require(cfg, "num_attention_heads", source)
  theta, scaling = rope_from_hf(cfg, source)
  fields = dict(
    vocab_size=_require(cfg, "vocab_size", source),
    hidden_size=_require(cfg, "hidden_size", source),
    num_layers=_require(cfg, "num_hidden_layers", source),
    num_heads=heads,
    num_kv_heads=cfg.get("num_key_value_heads") or heads,  # absent: plain multi-head attention
    intermediate_size=_require(cfg, "intermediate_size", source),
    head_dim=cfg.get("head_dim"),
    rope_theta=theta,
    rope_scaling=scaling,
    rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    qkv_bias=qkv_bias,
    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
    bos_token_id=_token_id(cfg, "bos_token_id", source),
    eos_token_id=_token_id(cfg, "eos_token_id", source),
    pad_token_id=_token_id(cfg, "pad_token_id", source),
  )
  unknown = set(overrides) - {f.name for f in dataclasses.fields(DecoderConfig)}
  if unknown:
    raise ConfigError(f"unknown DecoderConfig override(s) {sorted(unknown)}")
  fields.update(overrides)
  try:
    return DecoderConfig(**fields)
  except ValueError as e:
    raise ConfigError(f"{source}: {e}") from None


def check_attention_biases(cfg: DecoderConfig, keys, source: str) -> None:
  """Refuses a config whose decoder family contradicts the attention biases the weights hold, naming the
  config fields that chose the family and one tensor that contradicts it (before any tensor is read)."""
  keys = list(keys)
  q_biases = [k for k in keys if k.endswith("self_attn.q_proj.bias")]
  o_biases = [k for k in keys if k.endswith("self_attn.o_proj.bias")]
  chose = "fields 'architectures' / 'model_type' / 'attention_bias'"
  if cfg.qkv_bias and not q_biases and any(k.endswith("self_attn.q_proj.weight") for k in keys):
    weight = next(k for k in keys if k.endswith("self_attn.q_proj.weight"))
    raise ConfigError(
      f"{source}: {chose} build a Qwen2 decoder (q/k/v biases), but the weights have "
      f"{weight!r} and no {weight[: -len('weight')] + 'bias'!r}: a Llama-family checkpoint?"
    )
  if not cfg.qkv_bias and q_biases:
    raise ConfigError(
      f"{source}: {chose} build a Llama decoder (no attention biases), but the weights hold "
      f"{q_biases[0]!r}: set architectures to ['Qwen2ForCausalLM'] if this is a Qwen2 checkpoint"
    )
  if o_biases:
    raise ConfigError(
      f"{source}: the weights hold {o_biases[0]!r} (an o_proj bias: Llama with attention_bias=true); "
      "DecoderConfig cannot represent it"
    )


# ----------------------------------------------------------------------------------------------------
# Weight rules


def decoder_rules(
  cfg: DecoderConfig,
  *,
  prefix: str = "model.",
  lm_head_key: str = "lm_head.weight",
  param_prefix: str = "",
  name: str = "causal LM",
) -> RuleTable:
  """HF Qwen2/Llama causal-LM tensors <-> `CausalLM` params (scanned or unrolled per cfg.scan_layers).

  prefix: the decoder body's key prefix ("model." for *ForCausalLM files, "language_model.model." in
  the multimodal layouts); lm_head_key: the full output-projection key; param_prefix: where the
  CausalLM sits in a bigger model's param tree ("" when it is the whole model).
  """
  d, v, f = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.kv_head_dim
  layer = "decoder/layers_{layer}"
  hf = "layers.{layer}"
  body = [
    rename(f"{hf}.input_layernorm.weight", f"{layer}/input_norm/scale", (d,)),
    linear(f"{hf}.self_attn.q_proj.weight", f"{layer}/self_attn/q_proj/kernel", (d,), (h, hd)),
    linear(f"{hf}.self_attn.k_proj.weight", f"{layer}/self_attn/k_proj/kernel", (d,), (kv, hd)),
    linear(f"{hf}.self_attn.v_proj.weight", f"{layer}/self_attn/v_proj/kernel", (d,), (kv, hd)),
    linear(f"{hf}.self_attn.o_proj.weight", f"{layer}/self_attn/o_proj/kernel", (h, hd), (d,)),
    rename(f"{hf}.post_attention_layernorm.weight", f"{layer}/post_attn_norm/scale", (d,)),
    linear(f"{hf}.mlp.gate_proj.weight", f"{layer}/mlp/gate_proj/kernel", (d,), (f,)),
    linear(f"{hf}.mlp.up_proj.weight", f"{layer}/mlp/up_proj/kernel", (d,), (f,)),
    linear(f"{hf}.mlp.down_proj.weight", f"{layer}/mlp/down_proj/kernel", (f,), (d,)),
  ]
  if cfg.qkv_bias:
    body += [
      bias(f"{hf}.self_attn.q_proj.bias", f"{layer}/self_attn/q_proj/bias", (h, hd)),
      bias(f"{hf}.self_attn.k_proj.bias", f"{layer}/self_attn/k_proj/bias", (kv, hd)),
      bias(f"{hf}.self_attn.v_proj.bias", f"{layer}/self_attn/v_proj/bias", (kv, hd)),
    ]
  rules = [
    rename("embed_tokens.weight", "embed_tokens/embedding", (v, d)),
    rename("norm.weight", "final_norm/scale", (d,)),
    *per_layer(body, cfg.num_layers, cfg.scan_layers),
  ]
  # Cached RoPE tables some older exports contain; recomputed, never loaded.
  ignore = [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
  table = RuleTable(tuple(rules), tuple(ignore), name).with_prefix(prefix, param_prefix)
  head = linear(lm_head_key, "lm_head/kernel", (d,), (v,)).with_prefix("", param_prefix)
  if cfg.tie_word_embeddings:
    # transformers ignores a stored lm_head when the embeddings are tied; so do we.
    return RuleTable(table.rules, table.ignore + (re.escape(lm_head_key),), name)
  return RuleTable(table.rules + (head,), table.ignore, name)


def qwen2_rules(cfg: DecoderConfig, **kwargs) -> RuleTable:
  """Qwen2ForCausalLM (q/k/v biases)."""
  if not cfg.qkv_bias:
    raise ConfigError("Qwen2 checkpoints have q/k/v biases; this DecoderConfig has qkv_bias=False")
  return decoder_rules(cfg, name=kwargs.pop("name", "Qwen2ForCausalLM"), **kwargs)


def llama_rules(cfg: DecoderConfig, **kwargs) -> RuleTable:
  """LlamaForCausalLM (no attention biases)."""
  return decoder_rules(cfg, name=kwargs.pop("name", "LlamaForCausalLM"), **kwargs)
