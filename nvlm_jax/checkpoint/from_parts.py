"""Build NVLM-X / NVLM-H from released parts: an LLM checkpoint + an InternViT checkpoint (+ new layers).

No NVLM-X/H weights were released. The paper starts both from the same parts as NVLM-D (a text LLM and
InternViT-6B-448px-V1-5) and trains the new modules (paper 4.5, Table 10). The new modules are initialized
as that implies:

  - gated cross-attention blocks: q/k/v/o and SwiGLU kernels ~ N(0, init_std = 0.02, the LLM's initializer
    range), norm scales 1, both gates 0 -> tanh(0) = 0, so the built model computes exactly its LLM on any
    text until the gates move;
  - projector (X: one layer, H: the two-layer mlp1): kernels ~ N(0, 0.02), LayerNorm scale 1 / bias 0
    (or given: `projector_params`, e.g. NVLM-D-72B's mlp1 for an H model of the same sizes).

The LLM's stacked layer params [L, ...] are reshaped into the groups of the cross-attention decoder
(gated_cross_attention.py): LLM layer i = g * every + j -> layers_before[g, j] (j < offset) or
layers_after[g, j - offset]. `llm_params_from_cross_attention` is the inverse (extract the LLM again).

    model, params = build_from_released_parts("Qwen2-72B-Instruct/", "InternViT-6B-448px-V1-5/", variant="x")
    save_checkpoint("nvlm_x_72b_init/", model.config, params)   # our orbax layout (training/checkpointing.py)
    model, params = load_checkpoint("nvlm_x_72b_init/")          # = training.checkpointing.load_checkpoint

The saved directory is a trainer workdir (`nvlm_model.json` + `checkpoints/0/{params, model}`), so
`train.py --config.checkpoint.init_from=DIR` and `checkpointing.load_checkpoint(DIR)` both restore it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvlm_jax import models
from nvlm_jax import sharding as sharding_lib
from nvlm_jax.config import CrossAttentionConfig, DecoderConfig, NVLMConfig, ProjectorConfig, VisionConfig
from nvlm_jax.fusion.gated_cross_attention import merge_layer_groups, split_layer_groups
from nvlm_jax.language.decoder import CausalLM
from nvlm_jax.models import load_pretrained
from nvlm_jax.processing.tokenizer import NvlmTokenizer
from nvlm_jax.training import checkpointing
from nvlm_jax.vision.intern_vit import InternViT

log = logging.getLogger(__name__)

NEW_MODULES = ("projector", "cross_attn")  # what build_from_released_parts initializes
DEFAULT_IMAGE_CONTEXT_TOKEN = "<|vision_pad|>"
DEFAULT_IMAGE_START = "<Image>"


# ----------------------------------------------------------------------------------------------------
# Parameter layout: LLM <-> cross-attention decoder.


def _check_cross_config(config: NVLMConfig) -> tuple[int, int, int]:
  if config.variant not in ("x", "h"):
    raise ValueError(f"variant {config.variant!r} has no cross-attention decoder")
  xc, layers = config.cross_attention, config.llm.num_layers
  return xc.num_blocks(layers), xc.every, xc.resolved_offset


def llm_to_cross_attention_params(llm_params: Mapping[str, Any], config: NVLMConfig) -> dict:
  """CausalLM params -> the `language_model` params of an X/H model, without the cross_attn blocks.

  Scanned: decoder/layers/* [L, ...] -> decoder/groups/layers_before/* [G, offset, ...] and
  decoder/groups/layers_after/* [G, every - offset, ...]. Unrolled: decoder/layers_{i} keep their names.
  """
  groups, every, offset = _check_cross_config(config)
  out = {k: v for k, v in llm_params.items() if k != "decoder"}
  decoder = llm_params["decoder"]
  if not config.llm.scan_layers:
    missing = [f"layers_{i}" for i in range(config.llm.num_layers) if f"layers_{i}" not in decoder]
    if missing:
      raise ValueError(f"LLM params are not unrolled as config.llm.scan_layers=False expects: no {missing[:3]}")
    out["decoder"] = dict(decoder)
    return out
  if "layers" not in decoder:
    raise ValueError(
      f"LLM params are not scanned as config.llm.scan_layers=True expects (decoder has {sorted(decoder)[:3]}...)"
    )
  stacked = decoder["layers"]
  for x in jax.tree.leaves(stacked):
    if x.shape[0] != groups * every:
      raise ValueError(f"LLM layer stack of {x.shape[0]} layers; the config expects {groups * every}")
  out["decoder"] = {"groups": split_layer_groups(stacked, config.cross_attention, config.llm.num_layers)}
  return out


def llm_params_from_cross_attention(lm_params: Mapping[str, Any], config: NVLMConfig) -> dict:
  """The inverse: an X/H model's `language_model` params -> plain CausalLM params (cross_attn dropped)."""
  groups, every, offset = _check_cross_config(config)
  out = {k: v for k, v in lm_params.items() if k != "decoder"}
  decoder = lm_params["decoder"]
  if not config.llm.scan_layers:
    out["decoder"] = {k: v for k, v in decoder.items() if not k.startswith("cross_attn_")}
    return out
  out["decoder"] = {"layers": merge_layer_groups(decoder["groups"], config.cross_attention, config.llm.num_layers)}
  return out


def _is_new(path: tuple[str, ...]) -> bool:
  return path[0] == "projector" or any(p.startswith("cross_attn") for p in path)


def _select_new(params: Mapping[str, Any]) -> dict:
  """The subtrees build_from_released_parts initializes (projector, every cross_attn block)."""
  from flax import traverse_util

  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if _is_new(k)})


def _merge(*trees: Mapping[str, Any]) -> dict:
  from flax import traverse_util

  flat = {}
  for tree in trees:
    for key, value in traverse_util.flatten_dict(tree).items():
      if key in flat:
        raise ValueError(f"parameter {'/'.join(key)} given twice while assembling the model")
      flat[key] = value
  return traverse_util.unflatten_dict(flat)


def init_params(config: NVLMConfig, rng: jax.Array, *, only_new: bool = False) -> dict:
  """Random params of the whole model (or, with only_new, just the projector and the cross-attention
  blocks; the rest of the init is dead code that XLA drops, so a 72B LLM is never materialized)."""
  model = models.module_for_config(config)
  ids = jnp.zeros((1, 8), jnp.int32)

  def init(rng):
    params = nn.meta.unbox(model.init(rng, ids))["params"]
    return _select_new(params) if only_new else params

  return jax.jit(init)(rng)


def assemble_params(
  config: NVLMConfig, llm_params: Mapping[str, Any], vision_params: Mapping[str, Any], new_params: Mapping[str, Any]
) -> dict:
  """Full X/H params from the LLM's, the ViT's and the new modules' (`init_params(only_new=True)`)."""
  lm = llm_to_cross_attention_params(llm_params, config)
  params = _merge({"vision_model": dict(vision_params), "language_model": lm}, new_params)
  expected = jax.eval_shape(
    lambda: nn.meta.unbox(models.module_for_config(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))[
      "params"
    ]
  )
  _check_tree(params, expected)
  return params


def _check_tree(params, expected) -> None:
  from flax import traverse_util

  got, want = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(expected, sep="/")
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [
    f"{k}: shape {tuple(got[k].shape)}, expected {tuple(want[k].shape)}"
    for k in sorted(set(got) & set(want))
    if tuple(got[k].shape) != tuple(want[k].shape)
  ]
  if problems:
    raise ValueError("assembled parameters do not match the model:\n  " + "\n  ".join(problems[:20]))


# ----------------------------------------------------------------------------------------------------
# Configs and the whole build.


def default_cross_attention(llm: DecoderConfig, blocks: int = 10) -> CrossAttentionConfig:
  """The paper's 10 blocks (one per num_layers / 10 LLM layers), each before its group's last layer."""
  if llm.num_layers % blocks:
    raise ValueError(
      f"the LLM has {llm.num_layers} layers, not a multiple of {blocks} blocks; pass "
      "cross_attention=CrossAttentionConfig(every=..., ...)"
    )
  every = llm.num_layers // blocks
  return CrossAttentionConfig(every=every, offset=every - 1)


def tokenizer_ids(
  directory: str | os.PathLike,
  *,
  image_context_token: str = DEFAULT_IMAGE_CONTEXT_TOKEN,
  image_start: str = DEFAULT_IMAGE_START,
) -> dict[str, Any]:
  """{image_token_id, image_start_token_ids} from a directory's tokenizer files ({} if it has none)."""
  if not (Path(directory) / "tokenizer.json").is_file():
    return {}
  tok = NvlmTokenizer.from_pretrained(directory)
  ids: dict[str, Any] = {"image_start_token_ids": tuple(tok.encode(image_start))}
  if tok.has_token(image_context_token):
    ids["image_token_id"] = tok.token_to_id(image_context_token)
  return ids


def build_config(
  variant: str,
  llm: DecoderConfig,
  vision: VisionConfig,
  *,
  image_token_id: int,
  cross_attention: CrossAttentionConfig | None = None,
  image_start_token_ids=(),
  **nvlm_fields,
) -> NVLMConfig:
  if variant not in ("x", "h"):
    raise ValueError(f"variant must be 'x' or 'h', got {variant!r}")
  ratio = nvlm_fields.get("downsample_ratio", 0.5)
  return NVLMConfig(
    variant=variant,
    vision=vision,
    projector=ProjectorConfig.for_variant(variant, vision, llm, ratio),
    llm=llm,
    image_token_id=int(image_token_id),
    cross_attention=cross_attention or default_cross_attention(llm),
    image_start_token_ids=tuple(int(i) for i in image_start_token_ids),
    **nvlm_fields,
  )


def build_from_released_parts(
  llm_dir: str | os.PathLike,
  vision_dir: str | os.PathLike,
  *,
  variant: str,
  cross_attention: CrossAttentionConfig | None = None,
  image_token_id: int | None = None,
  image_start_token_ids=None,
  tokenizer_dir: str | os.PathLike | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  scan_layers: bool = True,
  seed: int = 0,
  projector_params: Mapping[str, Any] | None = None,
  mesh=None,
  **nvlm_fields,
) -> tuple[nn.Module, dict]:
  """(NVLMX or NVLMH, params) from a Qwen2/Llama checkpoint dir and an InternViT dir (module docstring).

  Token ids: `image_token_id` (the placeholder, default: `<|vision_pad|>` of the tokenizer in
  tokenizer_dir or llm_dir) and `image_start_token_ids` (default: `<Image>` as that tokenizer encodes it)
  must match the Processor the model will be fed by. nvlm_fields: other NVLMConfig fields (max_tiles, ...).
  With a `mesh`, every parameter is loaded / created directly on its sharding.
  """

  param_dtype = param_dtype or dtype
  llm_model, llm_params = load_pretrained(llm_dir, dtype, param_dtype=param_dtype, scan_layers=scan_layers, mesh=mesh)
  if not isinstance(llm_model, CausalLM):
    raise ValueError(f"{llm_dir}: expected a text LLM checkpoint (Qwen2/Llama), found {type(llm_model).__name__}")
  vit_model, vit_params = load_pretrained(
    vision_dir, dtype, param_dtype=param_dtype, scan_layers=scan_layers, mesh=mesh
  )
  if not isinstance(vit_model, InternViT):
    raise ValueError(f"{vision_dir}: expected an InternViT checkpoint, found {type(vit_model).__name__}")
  ids = tokenizer_ids(tokenizer_dir or llm_dir)
  if image_token_id is None:
    if "image_token_id" not in ids:
      raise ValueError(
        f"{tokenizer_dir or llm_dir}: no tokenizer defining {DEFAULT_IMAGE_CONTEXT_TOKEN!r}; pass "
        "image_token_id= (the placeholder id the Processor writes)"
      )
    image_token_id = ids["image_token_id"]
  if image_start_token_ids is None:
    image_start_token_ids = ids.get("image_start_token_ids", ())
    if not image_start_token_ids:
      log.warning(
        "no tokenizer found: image_start_token_ids left empty; the first tile tag of each image is "
        "then located by max_tag_tokens alone (docs/fusion.md)"
      )
  config = build_config(
    variant,
    llm_model.config,
    vit_model.config,
    image_token_id=image_token_id,
    cross_attention=cross_attention,
    image_start_token_ids=image_start_token_ids,
    **nvlm_fields,
  )
  model = models.module_for_config(config)
  new = init_params(config, jax.random.key(seed), only_new=True)
  if projector_params is not None:
    new = {**new, "projector": jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(param_dtype)), dict(projector_params))}
  if mesh is None:
    params = assemble_params(config, llm_params, vit_params, new)
  else:
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    shardings = sharding_lib.shardings_for(boxed, mesh)
    params = jax.jit(lambda l, v, n: assemble_params(config, l, v, n), out_shardings=shardings)(
      llm_params, vit_params, new
    )
  return model, params


# ----------------------------------------------------------------------------------------------------
# Our checkpoint format (nvlm_jax/training/checkpointing.py): WORKDIR/nvlm_model.json +
# WORKDIR/checkpoints/<step>/{params, model}.


def save_checkpoint(directory: str | os.PathLike, config: NVLMConfig, params: Mapping[str, Any], step: int = 0) -> Path:
  """Writes params + model description as a trainer workdir; returns the step directory."""
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  description = models.describe_model(config)
  checkpointing.write_model_description(directory, description)
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory / checkpointing.CHECKPOINT_SUBDIR, options=options) as manager:
    manager.save(
      step,
      args=ocp.args.Composite(params=ocp.args.StandardSave(dict(params)), model=ocp.args.JsonSave(description)),
      force=True,
    )
    manager.wait_until_finished()
  return directory / checkpointing.CHECKPOINT_SUBDIR / str(step)


def load_checkpoint(directory: str | os.PathLike, **kwargs) -> tuple[nn.Module, dict]:
  """(model, params) of a directory written by save_checkpoint (or by the trainer); kwargs as
  nvlm_jax.training.checkpointing.load_checkpoint (step, mesh, dtype, param_dtype)."""
  return checkpointing.load_checkpoint(directory, **kwargs)


__all__ = [
  "llm_to_cross_attention_params",
  "llm_params_from_cross_attention",
  "init_params",
  "assemble_params",
  "default_cross_attention",
  "tokenizer_ids",
  "build_config",
  "build_from_released_parts",
  "save_checkpoint",
  "load_checkpoint",
  "NEW_MODULES",
]
