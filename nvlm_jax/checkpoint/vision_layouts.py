"""Vision-side checkpoint layouts: InternViT, the projectors, and the whole multimodal checkpoints.

Registered import layouts (see hf_import.REGISTRY):
- "InternVLForConditionalGeneration": transformers' InternVL as `save_pretrained` writes it (hub names
  `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`).
- "InternVLForConditionalGeneration(in-memory names)": the same model saved with its module names
  (`model.vision_tower.*`, ..., `lm_head.weight`), as some hub repos are.
- "NVLM_D": nvidia/NVLM-D-72B (docs/paper.md (h)): `vision_model.*` (InternVL module names, fused qkv, ViT padded
  with zero dummy heads), `mlp1.*` (bias-free projector), `language_model.*` (Qwen2); config.json with
  `vision_config` / `llm_config`.
- "InternVisionModel": a standalone InternViT directory (OpenGVLab/InternViT-6B-448px-V1-5 layout).
- "InternVLVisionModel": a standalone transformers InternVL vision tower.

The dummy heads of NVLM-D-72B (25 real heads stored as 32, Megatron TP=8 padding, docs/paper.md a.2) are sliced
off at import. A nonzero dummy slice that would change the output (qkv rows, proj columns) means the padded
model computes something a 25-head model cannot, so the import refuses and names the tensor; the dummy
part of the q/k-norm weights cannot change the output (it scales q/k values that are zero) and is dropped.
Export pads them back with zeros.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Collection, Mapping

import jax.numpy as jnp
import numpy as np

from nvlm_jax.checkpoint.hf_import import Layout, architectures_detector, register_layout
from nvlm_jax.checkpoint.mapping import LAYER, Rule, RuleTable, bias, linear, per_layer, rename
from nvlm_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from nvlm_jax.checkpoint.text_layouts import ConfigError, decoder_config_from_hf, decoder_rules
from nvlm_jax.config import NVLMConfig, ProjectorConfig, VisionConfig
from nvlm_jax.fusion.nvlm_d import NVLMD
from nvlm_jax.vision.intern_vit import InternViT

# Megatron trained NVLM's ViT with tensor parallelism 8 and padded its heads to a multiple of 8 (docs/paper.md a.2).
NVLM_D_VIT_HEAD_MULTIPLE = 8
# `<|vision_pad|>`, used when the directory has no tokenizer files naming it (docs/paper.md (e), open point 3).
NVLM_D_DEFAULT_IMAGE_TOKEN = "<|vision_pad|>"
NVLM_D_DEFAULT_IMAGE_TOKEN_ID = 151654


# ----------------------------------------------------------------------------------------------------
# Small rule factories.


def reshaped(hf_key: str, param_path: str, hf_shape, param_shape) -> Rule:
  """Same values, different shape (e.g. class token [1, 1, D] <-> [D], q_norm [D] <-> [heads, head_dim])."""
  hf_shape, param_shape = tuple(hf_shape), tuple(param_shape)
  return Rule(
    (hf_key,),
    (param_path,),
    (hf_shape,),
    (param_shape,),
    lambda x: (np.reshape(x, param_shape),),
    lambda x: (np.reshape(x, hf_shape),),
  )


def conv_patch(hf_key: str, param_path: str, hidden: int, channels: int, patch: int) -> Rule:
  """torch Conv2d weight [D, C, p, p] <-> our patch kernel [p, p, C, D]."""
  return Rule(
    (hf_key,),
    (param_path,),
    ((hidden, channels, patch, patch),),
    ((patch, patch, channels, hidden),),
    lambda w: (np.transpose(w, (2, 3, 1, 0)),),
    lambda k: (np.transpose(k, (3, 2, 0, 1)),),
  )


def norm_rules(hf: str, path: str, norm_type: str, dim: int) -> list[Rule]:
  rules = [rename(f"{hf}.weight", f"{path}/scale", (dim,))]
  if norm_type == "layer_norm":
    rules.append(rename(f"{hf}.bias", f"{path}/bias", (dim,)))
  return rules


class _LayerCounter:
  """Which layer a per-layer rule is converting: RuleTable.to_flax converts layers 0..n-1 in order."""

  def __init__(self, num_layers: int):
    self._it = itertools.cycle(range(num_layers))

  def next(self) -> int:
    return next(self._it)


def _refuse_nonzero(template: str, layer: int, what: str, values: np.ndarray) -> None:
  if values.size and np.any(values != 0):
    peak = float(np.max(np.abs(values.astype(np.float32))))
    raise CheckpointError(
      f"{template.replace(LAYER, str(layer))}: the dummy-head slice {what} is not zero (max |x| = {peak:g}). "
      "Slicing the padded heads off is only exact when they are all zero; this checkpoint was not "
      "produced by zero padding (or was trained with the padding), so it cannot be imported as a "
      "plain InternViT."
    )


# ----------------------------------------------------------------------------------------------------
# InternViT weights.


def _vit_layer_common(cfg: VisionConfig, hf: str, layer: str, names: Mapping[str, str]) -> list[Rule]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  rules = [
    rename(f"{hf}.{names['ls1']}", f"{layer}/ls1", (d,)),
    rename(f"{hf}.{names['ls2']}", f"{layer}/ls2", (d,)),
    *norm_rules(f"{hf}.{names['norm1']}", f"{layer}/norm1", cfg.norm_type, d),
    *norm_rules(f"{hf}.{names['norm2']}", f"{layer}/norm2", cfg.norm_type, d),
    linear(f"{hf}.mlp.fc1.weight", f"{layer}/mlp/fc1/kernel", (d,), (f,)),
    bias(f"{hf}.mlp.fc1.bias", f"{layer}/mlp/fc1/bias", (f,)),
    linear(f"{hf}.mlp.fc2.weight", f"{layer}/mlp/fc2/kernel", (f,), (d,)),
    bias(f"{hf}.mlp.fc2.bias", f"{layer}/mlp/fc2/bias", (d,)),
  ]
  return rules


def internvl_hf_vision_rules(
  cfg: VisionConfig, *, prefix: str = "", param_prefix: str = "", name: str = "transformers InternVL vision tower"
) -> RuleTable:
  """transformers `InternVLVisionModel` tensors (`embeddings.cls_token`, `encoder.layer.N.attention.*`,
  `lambda_1/2`, `layernorm_before/after`) <-> `InternViT` params."""
  d, h, hd, p = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.patch_size
  layer, hf = "encoder/layers_{layer}", "encoder.layer.{layer}"
  body = _vit_layer_common(
    cfg, hf, layer, dict(ls1="lambda_1", ls2="lambda_2", norm1="layernorm_before", norm2="layernorm_after")
  )
  for x in "qkv":
    body.append(linear(f"{hf}.attention.{x}_proj.weight", f"{layer}/attn/{x}_proj/kernel", (d,), (h, hd)))
    if cfg.qkv_bias:
      body.append(bias(f"{hf}.attention.{x}_proj.bias", f"{layer}/attn/{x}_proj/bias", (h, hd)))
  if cfg.qk_normalization:
    body += [reshaped(f"{hf}.attention.{x}_norm.weight", f"{layer}/attn/{x}_norm/scale", (d,), (h, hd)) for x in "qk"]
  body += [
    linear(f"{hf}.attention.projection_layer.weight", f"{layer}/attn/proj/kernel", (h, hd), (d,)),
    bias(f"{hf}.attention.projection_layer.bias", f"{layer}/attn/proj/bias", (d,)),
  ]
  rules = [
    conv_patch(
      "embeddings.patch_embeddings.projection.weight", "embeddings/patch_embedding/kernel", d, cfg.num_channels, p
    ),
    rename("embeddings.patch_embeddings.projection.bias", "embeddings/patch_embedding/bias", (d,)),
    reshaped(
      "embeddings.position_embeddings",
      "embeddings/position_embedding",
      (1, cfg.num_positions, d),
      (cfg.num_positions, d),
    ),
  ]
  if cfg.use_class_token:
    rules.append(reshaped("embeddings.cls_token", "embeddings/class_embedding", (1, 1, d), (d,)))
  rules += per_layer(body, cfg.num_layers, cfg.scan_layers)
  ignore = [r"embeddings\.mask_token"]  # masked-image-modelling token, unused for features
  return RuleTable(tuple(rules), tuple(ignore), name).with_prefix(prefix, param_prefix)


def _fused_qkv_rule(
  cfg: VisionConfig, hf_key: str, paths: tuple[str, str, str], stored_heads: int, is_bias: bool, label: str
) -> Rule:
  """HF/InternVL fused qkv [Q | K | V] (each `stored_heads` heads, real heads first) <-> q/k/v params."""
  d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  width, real = stored_heads * hd, h * hd
  hf_shape = (3 * width,) if is_bias else (3 * width, d)
  param_shape = (h, hd) if is_bias else (d, h, hd)
  counter = _LayerCounter(cfg.num_layers)

  def to_flax(w):
    layer = counter.next()
    outs = []
    for i, x in enumerate("qkv"):
      block = np.asarray(w[i * width : (i + 1) * width])
      _refuse_nonzero(
        label, layer, f"rows [{i * width + real}:{(i + 1) * width}] ({x} heads {h}..{stored_heads - 1})", block[real:]
      )
      block = block[:real]
      outs.append(block.reshape(h, hd) if is_bias else block.T.reshape(d, h, hd))
    return tuple(outs)

  def to_hf(*qkv):
    blocks = []
    for x in qkv:
      flat = x.reshape(real) if is_bias else x.reshape(d, real).T
      pad = np.zeros((width - real,) + flat.shape[1:], flat.dtype)
      blocks += [flat, pad]
    return (np.concatenate(blocks, axis=0),)

  return Rule((hf_key,), paths, (hf_shape,), (param_shape,) * 3, to_flax, to_hf)


def _padded_vector_rule(cfg: VisionConfig, hf_key: str, path: str, stored_heads: int) -> Rule:
  """q/k norm weight [stored_heads * hd] <-> scale [heads, head_dim]. The dummy part is dropped whatever it
  holds: it only ever scales the dummy heads' q/k, which are exactly zero (their qkv rows are checked), and
  the norm statistic covers the real channels only (docs/paper.md a.2), so it cannot change the output."""
  h, hd = cfg.num_heads, cfg.head_dim
  width, real = stored_heads * hd, h * hd

  def to_flax(w):
    return (np.asarray(w)[:real].reshape(h, hd),)

  def to_hf(x):
    return (np.concatenate([x.reshape(real), np.zeros((width - real,), x.dtype)]),)

  return Rule((hf_key,), (path,), ((width,),), ((h, hd),), to_flax, to_hf)


def _padded_proj_rule(cfg: VisionConfig, hf_key: str, path: str, stored_heads: int, label: str) -> Rule:
  """attn.proj weight [D, stored_heads * hd] (dummy columns must be zero) <-> kernel [heads, head_dim, D]."""
  d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  width, real = stored_heads * hd, h * hd
  counter = _LayerCounter(cfg.num_layers)

  def to_flax(w):
    layer = counter.next()
    w = np.asarray(w)
    _refuse_nonzero(label, layer, f"columns [{real}:{width}]", w[:, real:])
    return (w[:, :real].T.reshape(h, hd, d),)

  def to_hf(k):
    w = k.reshape(real, d).T
    return (np.concatenate([w, np.zeros((d, width - real), w.dtype)], axis=1),)

  return Rule((hf_key,), (path,), ((d, width),), ((h, hd, d),), to_flax, to_hf)


def intern_vit_rules(
  cfg: VisionConfig,
  *,
  stored_heads: int | None = None,
  prefix: str = "",
  param_prefix: str = "",
  name: str = "InternViT",
) -> RuleTable:
  """InternVL / NVLM module names (`embeddings.class_embedding`, `encoder.layers.N.attn.qkv`, `ls1`,
  `norm1`, ...) <-> `InternViT` params. stored_heads: heads as stored (NVLM-D: 32 for 25 real heads)."""
  d, h, p = cfg.hidden_size, cfg.num_heads, cfg.patch_size
  stored = h if stored_heads is None else stored_heads
  if stored < h:
    raise ValueError(f"stored_heads={stored} is fewer than the model's {h} heads")
  layer, hf = "encoder/layers_{layer}", "encoder.layers.{layer}"
  body = _vit_layer_common(cfg, hf, layer, dict(ls1="ls1", ls2="ls2", norm1="norm1", norm2="norm2"))
  key = lambda suffix: f"{hf}.attn.{suffix}"
  label = lambda suffix: f"{prefix}{hf}.attn.{suffix}"  # the full key, for error messages
  qkv_paths = tuple(f"{layer}/attn/{x}_proj/kernel" for x in "qkv")
  body.append(_fused_qkv_rule(cfg, key("qkv.weight"), qkv_paths, stored, False, label("qkv.weight")))
  if cfg.qkv_bias:
    bias_paths = tuple(f"{layer}/attn/{x}_proj/bias" for x in "qkv")
    body.append(_fused_qkv_rule(cfg, key("qkv.bias"), bias_paths, stored, True, label("qkv.bias")))
  if cfg.qk_normalization:
    body += [_padded_vector_rule(cfg, key(f"{x}_norm.weight"), f"{layer}/attn/{x}_norm/scale", stored) for x in "qk"]
  body += [
    _padded_proj_rule(cfg, key("proj.weight"), f"{layer}/attn/proj/kernel", stored, label("proj.weight")),
    bias(key("proj.bias"), f"{layer}/attn/proj/bias", (d,)),
  ]
  rules = [
    conv_patch("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", d, cfg.num_channels, p),
    rename("embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias", (d,)),
    reshaped(
      "embeddings.position_embedding",
      "embeddings/position_embedding",
      (1, cfg.num_positions, d),
      (cfg.num_positions, d),
    ),
  ]
  if cfg.use_class_token:
    rules.append(reshaped("embeddings.class_embedding", "embeddings/class_embedding", (1, 1, d), (d,)))
  rules += per_layer(body, cfg.num_layers, cfg.scan_layers)
  return RuleTable(tuple(rules), (), name).with_prefix(prefix, param_prefix)


# ----------------------------------------------------------------------------------------------------
# Projector weights.


def internvl_hf_projector_rules(
  cfg: ProjectorConfig, *, prefix: str = "multi_modal_projector.", param_prefix: str = "projector"
) -> RuleTable:
  """transformers `InternVLMultiModalProjector` (layer_norm, linear_1, linear_2, all with biases)."""
  if cfg.num_layers != 2 or not cfg.use_bias:
    raise ValueError("the transformers InternVL projector has two linear layers with biases")
  rules = [
    rename("layer_norm.weight", "norm/scale", (cfg.in_features,)),
    rename("layer_norm.bias", "norm/bias", (cfg.in_features,)),
    linear("linear_1.weight", "linear_1/kernel", (cfg.in_features,), (cfg.hidden_size,)),
    bias("linear_1.bias", "linear_1/bias", (cfg.hidden_size,)),
    linear("linear_2.weight", "linear_2/kernel", (cfg.hidden_size,), (cfg.out_features,)),
    bias("linear_2.bias", "linear_2/bias", (cfg.out_features,)),
  ]
  return RuleTable(tuple(rules), (), "InternVL projector").with_prefix(prefix, param_prefix)


def mlp1_projector_rules(cfg: ProjectorConfig, *, prefix: str = "mlp1.", param_prefix: str = "projector") -> RuleTable:
  """InternVL-Chat / NVLM `mlp1` = nn.Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3."""
  rules = [rename("0.weight", "norm/scale", (cfg.in_features,)), rename("0.bias", "norm/bias", (cfg.in_features,))]
  widths = (
    [(cfg.in_features, cfg.out_features)]
    if cfg.num_layers == 1
    else [(cfg.in_features, cfg.hidden_size), (cfg.hidden_size, cfg.out_features)]
  )
  for i, (n_in, n_out) in enumerate(widths):
    index = 1 + 2 * i
    rules.append(linear(f"{index}.weight", f"linear_{i + 1}/kernel", (n_in,), (n_out,)))
    if cfg.use_bias:
      rules.append(bias(f"{index}.bias", f"linear_{i + 1}/bias", (n_out,)))
  return RuleTable(tuple(rules), (), "mlp1 projector").with_prefix(prefix, param_prefix)


# ----------------------------------------------------------------------------------------------------
# config.json -> configs.


def _pair(value, field: str, source: str) -> int:
  """image_size / patch_size: int or a square [h, w]."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConfigError(f"{source}: field {field!r} is {value}; only square sizes are supported")
    value = value[0]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"{source}: field {field!r} must be a positive integer, found {value!r}")
  return value


def _field(cfg: Mapping[str, Any], field: str, source: str):
  if cfg.get(field) is None:
    raise ConfigError(f"{source}: required field {field!r} is missing")
  return cfg[field]


def _vision_config(fields: dict, overrides: Mapping[str, Any], source: str) -> VisionConfig:
  unknown = set(overrides) - {f.name for f in dataclasses.fields(VisionConfig)}
  if unknown:
    raise ConfigError(f"unknown VisionConfig override(s) {sorted(unknown)}")
  try:
    return VisionConfig(**{**fields, **overrides})
  except ValueError as e:
    raise ConfigError(f"{source}: {e}") from None


def vision_config_from_internvl_hf(
  cfg: Mapping[str, Any], *, source: str = "vision_config", select_layer: int = -1, **overrides
) -> VisionConfig:
  """A transformers InternVLVisionConfig dict -> VisionConfig (refuses what InternViT cannot compute)."""
  if cfg.get("hidden_act", "gelu") != "gelu":
    raise ConfigError(f"{source}: field 'hidden_act' is {cfg.get('hidden_act')!r}; only exact 'gelu' is implemented")
  if not cfg.get("use_mean_pooling", True):
    raise ConfigError(
      f"{source}: field 'use_mean_pooling' is false (a final LayerNorm on the last layer); "
      "InternViT has no final norm and this is not implemented"
    )
  if not cfg.get("use_absolute_position_embeddings", True):
    raise ConfigError(f"{source}: field 'use_absolute_position_embeddings' is false; not implemented")
  fields = dict(
    image_size=_pair(_field(cfg, "image_size", source), "image_size", source),
    patch_size=_pair(_field(cfg, "patch_size", source), "patch_size", source),
    hidden_size=_field(cfg, "hidden_size", source),
    num_layers=_field(cfg, "num_hidden_layers", source),
    num_heads=_field(cfg, "num_attention_heads", source),
    intermediate_size=_field(cfg, "intermediate_size", source),
    num_channels=cfg.get("num_channels", 3),
    norm_type=cfg.get("norm_type", "layer_norm"),
    layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
    qk_normalization=bool(cfg.get("use_qk_norm", False)),
    qkv_bias=bool(cfg.get("attention_bias", False)),
    layer_scale_init=float(cfg.get("layer_scale_init_value", 0.1)),
    select_layer=select_layer,
  )
  if fields["qk_normalization"] and fields["layer_norm_eps"] != 1e-6:
    # transformers builds the q/k RMSNorms with its default eps 1e-6 whatever layer_norm_eps says; we use
    # one eps for both, so the two only agree at 1e-6.
    raise ConfigError(
      f"{source}: use_qk_norm with layer_norm_eps={fields['layer_norm_eps']} (transformers uses "
      "1e-6 for the q/k norms); only layer_norm_eps=1e-6 is supported with q/k norm"
    )
  return _vision_config(fields, overrides, source)


def vision_config_from_intern_vit(
  cfg: Mapping[str, Any],
  *,
  source: str = "vision_config",
  select_layer: int = -1,
  image_size: int | None = None,
  **overrides,
) -> VisionConfig:
  """An InternVL/NVLM `InternVisionConfig` dict (model_type intern_vit_6b) -> VisionConfig."""
  if cfg.get("hidden_act", "gelu") != "gelu":
    raise ConfigError(f"{source}: field 'hidden_act' is {cfg.get('hidden_act')!r}; only exact 'gelu' is implemented")
  fields = dict(
    image_size=image_size or _pair(_field(cfg, "image_size", source), "image_size", source),
    patch_size=_pair(_field(cfg, "patch_size", source), "patch_size", source),
    hidden_size=_field(cfg, "hidden_size", source),
    num_layers=_field(cfg, "num_hidden_layers", source),
    num_heads=_field(cfg, "num_attention_heads", source),
    intermediate_size=_field(cfg, "intermediate_size", source),
    num_channels=cfg.get("num_channels", 3),
    norm_type=cfg.get("norm_type", "rms_norm"),
    layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
    qk_normalization=bool(cfg.get("qk_normalization", False)),
    qkv_bias=bool(cfg.get("qkv_bias", False)),
    layer_scale_init=float(cfg.get("initializer_factor", 0.1)),
    select_layer=select_layer,
  )
  return _vision_config(fields, overrides, source)


def _split_overrides(overrides: Mapping[str, Any], source: str):
  """NVLM import overrides: NVLMConfig fields at the top level, sub-config fields under 'vision' / 'llm'
  / 'projector'; 'remat_policy' applies to the ViT and the LLM."""
  overrides = dict(overrides)
  sub = {k: dict(overrides.pop(k, None) or {}) for k in ("vision", "llm", "projector")}
  if "remat_policy" in overrides:
    policy = overrides.pop("remat_policy")
    sub["vision"].setdefault("remat_policy", policy)
    sub["llm"].setdefault("remat_policy", policy)
  top_fields = {f.name for f in dataclasses.fields(NVLMConfig)}
  unknown = set(overrides) - top_fields
  if unknown:
    raise ConfigError(
      f"unknown NVLMConfig override(s) {sorted(unknown)}; sub-config fields go under 'vision', 'llm' or 'projector'"
    )
  return overrides, sub


def _nvlm_config(*, source, variant, vision, projector, llm, top) -> NVLMConfig:
  try:
    return NVLMConfig(variant=variant, vision=vision, projector=projector, llm=llm, **top)
  except ValueError as e:
    raise ConfigError(f"{source}: {e}") from None


def _impl(dtype: str, param_dtype: str, scan_layers: bool) -> dict:
  return dict(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)


def nvlm_config_from_internvl_hf(
  cfg: Mapping[str, Any],
  *,
  source: str = "config.json",
  dtype: str = "float32",
  param_dtype: str = "float32",
  scan_layers: bool = True,
  **overrides,
) -> NVLMConfig:
  """transformers InternVLConfig (config.json) -> NVLMConfig(variant 'd'), with the transformers projector
  (Linear(4Dv, D) + bias, Linear(D, D) + bias)."""
  top, sub = _split_overrides(overrides, source)
  feature_layer = cfg.get("vision_feature_layer", -1)
  if not isinstance(feature_layer, int):
    raise ConfigError(f"{source}: field 'vision_feature_layer' is {feature_layer!r}; only one layer is supported")
  strategy = cfg.get("vision_feature_select_strategy", "default")
  if strategy != "default":
    raise ConfigError(
      f"{source}: field 'vision_feature_select_strategy' is {strategy!r}; only 'default' "
      "(drop the class token) is supported"
    )
  if cfg.get("projector_hidden_act", "gelu") != "gelu":
    raise ConfigError(f"{source}: field 'projector_hidden_act' is {cfg.get('projector_hidden_act')!r}; only 'gelu'")
  impl = _impl(dtype, param_dtype, scan_layers)
  vision = vision_config_from_internvl_hf(
    _field(cfg, "vision_config", source),
    source=f"{source}: vision_config",
    select_layer=feature_layer,
    **{**impl, **sub["vision"]},
  )
  text = dict(_field(cfg, "text_config", source))
  text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
  llm = decoder_config_from_hf(text, source=f"{source}: text_config", **{**impl, **sub["llm"]})
  ratio = float(cfg.get("downsample_ratio", 0.5))
  projector = ProjectorConfig.internvl_hf(vision, llm, ratio, dtype=dtype, param_dtype=param_dtype)
  projector = dataclasses.replace(projector, **sub["projector"])
  top = {"image_token_id": _field(cfg, "image_token_id", source), "downsample_ratio": ratio, "ps_version": "v2", **top}
  return _nvlm_config(source=source, variant="d", vision=vision, projector=projector, llm=llm, top=top)


def _checkpoint_dir(source: str) -> Path:
  return Path(source).parent


def _tokenizer_token_id(directory: Path, token: str) -> int | None:
  """The id of an added token from tokenizer.json or tokenizer_config.json, if the directory has them."""
  file = directory / "tokenizer.json"
  if file.is_file():
    for entry in json.loads(file.read_text()).get("added_tokens", []):
      if entry.get("content") == token:
        return int(entry["id"])
  file = directory / "tokenizer_config.json"
  if file.is_file():
    for token_id, entry in (json.loads(file.read_text()).get("added_tokens_decoder") or {}).items():
      if entry.get("content") == token:
        return int(token_id)
  return None


def nvlm_d_stored_heads(num_heads: int) -> int:
  """Heads as stored in NVLM-D checkpoints: padded to a multiple of 8 (25 -> 32)."""
  return -(-num_heads // NVLM_D_VIT_HEAD_MULTIPLE) * NVLM_D_VIT_HEAD_MULTIPLE


def nvlm_config_from_nvlm_d(
  cfg: Mapping[str, Any],
  *,
  source: str = "config.json",
  dtype: str = "float32",
  param_dtype: str = "float32",
  scan_layers: bool = True,
  **overrides,
) -> NVLMConfig:
  """NVLM-D-72B config.json (`vision_config`, `llm_config`, top-level fields of NVLM_D_Config) -> NVLMConfig.

  Looked up beside config.json when present: the placeholder id of `<|vision_pad|>` (tokenizer files;
  config.json's `image_token_id` wins) and, if llm_config omits it, the vocabulary size (shape of the
  embedding in the shard headers).
  `ps_version` absent -> 'v2' (what Megatron trained NVLM with; NVLM_D_Config's class default is 'v1').
  """
  top, sub = _split_overrides(overrides, source)
  impl = _impl(dtype, param_dtype, scan_layers)
  image_size = cfg.get("force_image_size")
  vision = vision_config_from_intern_vit(
    _field(cfg, "vision_config", source),
    source=f"{source}: vision_config",
    select_layer=int(cfg.get("select_layer", -1)),
    image_size=image_size,
    **{**impl, **sub["vision"]},
  )
  # NVLM_D_Config builds Qwen2Config(**llm_config) whatever llm_config's model_type says, and the model class
  # comes from llm_config's `architectures` (decoder_config_from_hf's rule); without one, Qwen2.
  llm_json = {**_field(cfg, "llm_config", source), "model_type": "qwen2"}
  directory = _checkpoint_dir(source)
  if llm_json.get("vocab_size") is None:
    try:
      ckpt = SafetensorsCheckpoint(directory)
      llm_json["vocab_size"] = ckpt["language_model.model.embed_tokens.weight"].shape[0]
    except (CheckpointError, KeyError):
      raise ConfigError(
        f"{source}: llm_config has no 'vocab_size' and no language_model.model.embed_tokens.weight "
        "shape could be read beside it"
      ) from None
  llm = decoder_config_from_hf(llm_json, source=f"{source}: llm_config", **{**impl, **sub["llm"]})
  ratio = float(cfg.get("downsample_ratio", 0.5))
  projector = ProjectorConfig.mlp1(vision, llm, ratio, dtype=dtype, param_dtype=param_dtype)
  projector = dataclasses.replace(projector, **sub["projector"])
  # The placeholder id: config.json's `image_token_id` (our export writes it), else `<|vision_pad|>` of the
  # tokenizer files beside it (the release names it only there), else the release's id.
  image_token_id = cfg.get("image_token_id")
  if not isinstance(image_token_id, int):
    image_token_id = _tokenizer_token_id(directory, NVLM_D_DEFAULT_IMAGE_TOKEN)
  defaults = dict(
    image_token_id=NVLM_D_DEFAULT_IMAGE_TOKEN_ID if image_token_id is None else image_token_id,
    downsample_ratio=ratio,
    ps_version=cfg.get("ps_version", "v2"),
    max_tiles=int(cfg.get("max_dynamic_patch", 6)),
    use_thumbnail=bool(cfg.get("use_thumbnail", True)),
  )
  return _nvlm_config(source=source, variant="d", vision=vision, projector=projector, llm=llm, top={**defaults, **top})


# ----------------------------------------------------------------------------------------------------
# Whole-model rule tables.


def internvl_hf_rules(cfg: NVLMConfig, *, in_memory_names: bool = False) -> RuleTable:
  """transformers InternVLForConditionalGeneration files <-> NVLMD params."""
  model = "model." if in_memory_names else ""
  lm_body = f"{model}language_model." if in_memory_names else "language_model.model."
  lm_head = "lm_head.weight" if in_memory_names else "language_model.lm_head.weight"
  return (
    internvl_hf_vision_rules(cfg.vision, prefix=f"{model}vision_tower.", param_prefix="vision_model")
    + internvl_hf_projector_rules(cfg.projector, prefix=f"{model}multi_modal_projector.")
    + decoder_rules(
      cfg.llm, prefix=lm_body, lm_head_key=lm_head, param_prefix="language_model", name="InternVL language model"
    )
  )


def nvlm_d_rules(cfg: NVLMConfig, *, stored_heads: int | None = None) -> RuleTable:
  """NVLM-D-72B files (docs/paper.md (h)) <-> NVLMD params; the ViT's padded heads are checked and sliced off."""
  stored = nvlm_d_stored_heads(cfg.vision.num_heads) if stored_heads is None else stored_heads
  return (
    intern_vit_rules(
      cfg.vision, stored_heads=stored, prefix="vision_model.", param_prefix="vision_model", name="NVLM-D vision model"
    )
    + mlp1_projector_rules(cfg.projector)
    + decoder_rules(
      cfg.llm,
      prefix="language_model.model.",
      lm_head_key="language_model.lm_head.weight",
      param_prefix="language_model",
      name="NVLM-D language model",
    )
  )


# ----------------------------------------------------------------------------------------------------
# Registered layouts.


def _nvlmd(cfg: NVLMConfig):
  return NVLMD(cfg)


def _vit(cfg: VisionConfig):
  return InternViT(cfg)


def _text_init(cfg: NVLMConfig) -> tuple:
  return (jnp.zeros((1, 1), jnp.int32),)  # NVLMD creates its vision params at init without pixels


def _pixels_init(cfg: VisionConfig) -> tuple:
  return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)


def _has_key(*names: str):
  return lambda keys: any(n in keys for n in names)


def _and(arch_detect, key_detect):
  return lambda cfg, keys: arch_detect(cfg, keys) and key_detect(keys)


_internvl_detect = architectures_detector("InternVLForConditionalGeneration", model_type="internvl")

register_layout(
  Layout(
    name="InternVLForConditionalGeneration",
    detect=_and(_internvl_detect, _has_key("vision_tower.embeddings.patch_embeddings.projection.weight")),
    build_config=nvlm_config_from_internvl_hf,
    build_model=_nvlmd,
    build_rules=internvl_hf_rules,
    init_args=_text_init,
  )
)

register_layout(
  Layout(
    name="InternVLForConditionalGeneration(in-memory names)",
    detect=_and(_internvl_detect, _has_key("model.vision_tower.embeddings.patch_embeddings.projection.weight")),
    build_config=nvlm_config_from_internvl_hf,
    build_model=_nvlmd,
    build_rules=lambda cfg: internvl_hf_rules(cfg, in_memory_names=True),
    init_args=_text_init,
  )
)


def _nvlm_d_detect(cfg: Mapping[str, Any], keys: Collection[str]) -> bool:
  if "NVLM_D" in (cfg.get("architectures") or []):
    return True
  return "llm_config" in cfg and "mlp1.1.weight" in keys and "vision_model.embeddings.class_embedding" in keys


register_layout(
  Layout(
    name="NVLM_D",
    detect=_nvlm_d_detect,
    build_config=nvlm_config_from_nvlm_d,
    build_model=_nvlmd,
    build_rules=nvlm_d_rules,
    init_args=_text_init,
  )
)


def _standalone_vit_config(parse):
  def build(cfg, *, source="config.json", dtype="float32", param_dtype="float32", scan_layers=True, **overrides):
    return parse(cfg, source=source, **{**_impl(dtype, param_dtype, scan_layers), **overrides})

  return build


register_layout(
  Layout(
    name="InternVisionModel",
    detect=architectures_detector("InternVisionModel", model_type="intern_vit_6b"),
    build_config=_standalone_vit_config(vision_config_from_intern_vit),
    build_model=_vit,
    build_rules=lambda cfg: intern_vit_rules(cfg, name="InternVisionModel"),
    init_args=_pixels_init,
  )
)

register_layout(
  Layout(
    name="InternVLVisionModel",
    detect=architectures_detector("InternVLVisionModel", model_type="internvl_vision"),
    build_config=_standalone_vit_config(vision_config_from_internvl_hf),
    build_model=_vit,
    build_rules=lambda cfg: internvl_hf_vision_rules(cfg, name="InternVLVisionModel"),
    init_args=_pixels_init,
  )
)


def layout_rules(layout: Layout, model_cfg, ckpt: SafetensorsCheckpoint | None = None) -> RuleTable:
  """The layout's rule table; for NVLM-D, with the ViT heads as the files store them (padded with
  zero dummy heads as released, or unpadded as `export` writes without --pad-dummy-heads)."""
  if layout.name == "NVLM_D" and ckpt is not None:
    key = "vision_model.encoder.layers.0.attn.qkv.weight"
    if key in ckpt:
      rows, hd = ckpt[key].shape[0], model_cfg.vision.head_dim
      if rows % (3 * hd) == 0 and rows // (3 * hd) >= model_cfg.vision.num_heads:
        return nvlm_d_rules(model_cfg, stored_heads=rows // (3 * hd))
  return layout.build_rules(model_cfg)
