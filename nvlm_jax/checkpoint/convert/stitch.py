"""`convert stitch`: a new NVLM model from an InternViT checkpoint and an LLM checkpoint.

    python -m nvlm_jax.convert stitch --vision /ckpt/InternViT-6B-448px-V1-5 --llm /ckpt/Qwen2-72B-Instruct \
        --variant d --out /ckpt/nvlm_d_72b_init

The vision and language towers are copied tensor by tensor (from Hugging Face directories or from our
own checkpoints; an NVLM checkpoint can donate its `vision_model` or `language_model`); every parameter
of the new model that neither source provides (the projector; for NVLM-X/H also the gated
cross-attention layers) is freshly initialized. That init runs the model's own `init` under jit but
returns only the new params, so XLA drops everything else and the towers are never materialized.

Each variant is a `StitchVariant`: how to build its NVLMConfig from the two towers' configs, and what
to check about its fresh params (NVLM-X/H: the tanh gates start at zero, so the stitched model
initially computes exactly the LLM on text). Adding a variant is one entry in VARIANTS.

This is the one way to build a model from released parts (no NVLM-X/H weights were released; the paper
starts them, like NVLM-D, from a text LLM and InternViT-6B-448px-V1-5 and trains the new modules, paper 4.5,
Table 10). The new modules get the model's own init: gated cross-attention q/k/v/o and SwiGLU kernels
~ N(0, 0.02), norm scales 1, both gates 0; projector kernels ~ N(0, 0.02), LayerNorm scale 1 / bias 0.
Load the result with `models.load_model(out)` (or `train.py --config.checkpoint.init_from=out`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from nvlm_jax import models
from nvlm_jax.checkpoint import orbax_stream
from nvlm_jax.checkpoint.convert.importer import parse_mesh, stream_into, write_provenance
from nvlm_jax.checkpoint.convert.output import (
  ConvertError,
  Progress,
  atomic_output_dir,
  copy_side_files,
  refuse_existing,
)
from nvlm_jax.checkpoint.convert.sources import DTYPES, HFSource, WorkItem, open_source
from nvlm_jax.checkpoint.vision_layouts import _tokenizer_token_id
from nvlm_jax.config import CrossAttentionConfig, DecoderConfig, NVLMConfig, ProjectorConfig, VisionConfig
from nvlm_jax.processing.tokenizer import NvlmTokenizer

VISION_PREFIX, LLM_PREFIX = "vision_model", "language_model"
IMAGE_TOKEN = "<|vision_pad|>"
IMAGE_START = "<Image>"  # X/H: locates each image's first tile tag (docs/fusion.md)


@dataclasses.dataclass(frozen=True)
class StitchOptions:
  image_token_id: int
  image_start_token_ids: tuple[int, ...] = ()  # X/H: `<Image>` as the LLM's tokenizer encodes it
  cross_attention: CrossAttentionConfig | None = None  # X/H: None = the paper's 10 blocks
  downsample_ratio: float = 0.5
  max_tiles: int = 6
  use_thumbnail: bool = True


PieceMap = Callable[[str, Any], tuple[str, Any]]  # (param path, index) -> (param path, index)


@dataclasses.dataclass(frozen=True)
class StitchVariant:
  """How one NVLM variant is stitched.

  build_config(vision, llm, options) -> NVLMConfig.
  llm_layout(config) -> (map_shapes, map_piece) or None: how the LLM's params are laid out in the new
    model (None: unchanged). map_shapes turns {path: full shape} into the new model's {path: shape};
    map_piece moves one written piece (path, layer index).
  check_fresh(fresh params by path): raises if the new modules are not initialized as the variant needs.
  """

  name: str
  build_config: Callable[[VisionConfig, DecoderConfig, StitchOptions], NVLMConfig]
  llm_layout: Callable[[NVLMConfig], tuple[Callable, PieceMap] | None] = lambda cfg: None
  check_fresh: Callable[[Mapping[str, np.ndarray]], None] | None = None


def nvlm_d_config(vision: VisionConfig, llm: DecoderConfig, opts: StitchOptions) -> NVLMConfig:
  """NVLM-D: mlp1 (LayerNorm -> Linear(4 Dv, llm intermediate) -> GELU -> Linear(., llm hidden), no bias)."""
  return NVLMConfig(
    variant="d",
    vision=vision,
    projector=ProjectorConfig.mlp1(vision, llm, opts.downsample_ratio),
    llm=llm,
    image_token_id=opts.image_token_id,
    downsample_ratio=opts.downsample_ratio,
    max_tiles=opts.max_tiles,
    use_thumbnail=opts.use_thumbnail,
  )


def default_cross_attention(llm: DecoderConfig, blocks: int = 10) -> CrossAttentionConfig:
  """The paper's 10 blocks (one per num_layers / 10 LLM layers), each before its group's last layer."""
  if llm.num_layers % blocks:
    raise ValueError(
      f"the LLM has {llm.num_layers} layers, not a multiple of {blocks} blocks; pass "
      "cross_attention=CrossAttentionConfig(every=..., ...)"
    )
  every = llm.num_layers // blocks
  return CrossAttentionConfig(every=every, offset=every - 1)


def cross_attention_config(variant: str):
  """NVLM-X / NVLM-H config from the towers: X a one-layer projector, H mlp1 (ProjectorConfig.for_variant); gated
  cross-attention blocks every num_layers / 10 LLM layers unless --xattn-every says otherwise."""

  def build(vision: VisionConfig, llm: DecoderConfig, opts: StitchOptions) -> NVLMConfig:
    return NVLMConfig(
      variant=variant,
      vision=vision,
      projector=ProjectorConfig.for_variant(variant, vision, llm, opts.downsample_ratio),
      llm=llm,
      image_token_id=opts.image_token_id,
      cross_attention=opts.cross_attention or default_cross_attention(llm),
      image_start_token_ids=tuple(opts.image_start_token_ids),
      downsample_ratio=opts.downsample_ratio,
      max_tiles=opts.max_tiles,
      use_thumbnail=opts.use_thumbnail,
    )

  return build


_LLM_LAYERS = "language_model/decoder/layers/"
_GROUPS = "language_model/decoder/groups/"


def cross_attention_layout(cfg: NVLMConfig):
  """Scanned X/H models regroup the LLM's stacked layers around the cross-attention blocks: LLM layer
  i = g * every + j -> groups/layers_before[g, j] (j < offset) or groups/layers_after[g, j - offset]
  (CrossAttentionConfig.group_parts / layer_slot, one layer at a time). Unrolled: names unchanged."""
  if not cfg.llm.scan_layers:
    return None
  xc = cfg.cross_attention
  every, groups = xc.every, xc.num_blocks(cfg.llm.num_layers)

  def map_shapes(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    out = {}
    for path, shape in shapes.items():
      if not path.startswith(_LLM_LAYERS):
        out[path] = shape
        continue
      if shape[0] != groups * every:
        raise ConvertError(
          f"stitch: {path} stacks {shape[0]} LLM layers; {groups} blocks x {every} need {groups * every}"
        )
      rest = path[len(_LLM_LAYERS) :]
      for name, (lo, hi) in xc.group_parts().items():
        out[f"{_GROUPS}{name}/{rest}"] = (groups, hi - lo, *shape[1:])
    return out

  def map_piece(path: str, index):
    if not path.startswith(_LLM_LAYERS):
      return path, index
    name, g, j = xc.layer_slot(index)
    return f"{_GROUPS}{name}/{path[len(_LLM_LAYERS) :]}", (g, j)

  return map_shapes, map_piece


_GATE = re.compile(r"(^|/)[^/]*gate[^/]*$")


def gates_are_zero(fresh: Mapping[str, np.ndarray]) -> None:
  """NVLM-X/H: every fresh tanh-gate parameter starts at 0 (the stitched model then equals the LLM on
  text). Gate params are named '*gate*' at the end of their path; SwiGLU `gate_proj` kernels are not
  gates."""
  gates = [p for p in fresh if _GATE.search(p) and "gate_proj" not in p]
  if not gates:
    raise ConvertError("stitch: the new cross-attention layers have no '*gate*' parameters to check")
  nonzero = [p for p in gates if np.any(np.asarray(fresh[p]) != 0)]
  if nonzero:
    raise ConvertError(f"stitch: fresh gates must start at zero; non-zero: {nonzero[:5]}")


VARIANTS: dict[str, StitchVariant] = {
  "d": StitchVariant("d", nvlm_d_config),
  "x": StitchVariant("x", cross_attention_config("x"), cross_attention_layout, gates_are_zero),
  "h": StitchVariant("h", cross_attention_config("h"), cross_attention_layout, gates_are_zero),
}


# ----------------------------------------------------------------------------------------------------
# One tower of a source checkpoint


@dataclasses.dataclass
class Tower:
  """The part of a source checkpoint that becomes one tower of the stitched model."""

  config: Any  # VisionConfig or DecoderConfig
  shapes: dict[str, tuple]  # param path in the stitched model (before any variant re-layout) -> shape
  items: Callable[[], Iterator[WorkItem]]
  nbytes: int
  tensors: int
  directory: Path  # where its tokenizer files would be


def _tower(path: str | os.PathLike, want: str, dtype: str) -> Tower:
  kind, cls, prefix = (
    ("--vision", VisionConfig, VISION_PREFIX) if want == "vision" else ("--llm", DecoderConfig, LLM_PREFIX)
  )
  source = open_source(path, dtype=dtype)
  cfg = source.config
  if isinstance(cfg, NVLMConfig) and (want == "vision" or cfg.variant == "d"):
    part, inner = getattr(cfg, "vision" if want == "vision" else "llm"), prefix
  elif isinstance(cfg, cls):
    part, inner = cfg, ""
  else:
    what = f"NVLM-{cfg.variant.upper()} model" if isinstance(cfg, NVLMConfig) else cls.__name__
    raise ConvertError(
      f"{kind} {path}: holds a {type(cfg).__name__}{'' if what == cls.__name__ else f' ({what})'}; "
      f"expected a {cls.__name__} (or an NVLM-D checkpoint whose {prefix} is used)"
    )
  cut = f"{prefix}/"
  if isinstance(source, HFSource):
    shapes = {
      p if inner else f"{cut}{p}": s for p, s in source.table.param_shapes().items() if not inner or p.startswith(cut)
    }
    rules = [r for r in source.table.rules if not inner or all(p.startswith(cut) for p in r.param_paths)]
    keys = [k for r in rules for layer in r.layers for k in r.keys_at(layer)]
    nbytes = sum(source.ckpt[k].end - source.ckpt[k].start for k in keys)
    wanted = set(keys)

    def items():
      for item in source.items("" if inner else prefix):
        if not inner or wanted.issuperset(item.keys):
          yield item

    return Tower(part, shapes, items, nbytes, len(keys), source.directory)
  shapes = {f"{cut}{p}": s for p, s in source.shapes(inner).items()}
  nbytes = sum(a.nbytes for p, a in source.reader.arrays.items() if not inner or p.startswith(cut))
  return Tower(
    part, shapes, lambda: source.items(source_prefix=inner, param_prefix=prefix), nbytes, len(shapes), source.workdir
  )


def _mapped(items: Iterator[WorkItem], map_piece: PieceMap | None) -> Iterator[WorkItem]:
  if map_piece is None:
    yield from items
    return
  for item in items:

    def run(inner=item.run):
      return [(*map_piece(path, index), array) for path, index, array in inner()]

    yield dataclasses.replace(item, run=run)


def tokenizer_ids(directory: Path) -> dict[str, Any]:
  """{image_token_id, image_start_token_ids} from the LLM's tokenizer files, where it has them: the
  placeholder `<|vision_pad|>` and `<Image>` as that tokenizer encodes it."""
  ids: dict[str, Any] = {}
  if (directory / "tokenizer.json").is_file():
    try:
      tok = NvlmTokenizer.from_pretrained(directory)
      ids["image_start_token_ids"] = tuple(tok.encode(IMAGE_START))
      if tok.has_token(IMAGE_TOKEN):
        ids["image_token_id"] = tok.token_to_id(IMAGE_TOKEN)
    except (OSError, ValueError, KeyError):
      pass
  if "image_token_id" not in ids:
    try:
      token_id = _tokenizer_token_id(directory, IMAGE_TOKEN)
    except (OSError, ValueError, KeyError):
      token_id = None
    if token_id is not None:
      ids["image_token_id"] = token_id
  return ids


def _with_dtype(cfg, dtype: str):
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)


def fresh_params(model: nn.Module, model_cfg, paths: list[str], seed: int) -> dict[str, np.ndarray]:
  """The model's own init of `paths` only: jit returns just those, so XLA removes the rest of the
  init (the towers' random weights, the dummy forward) and never allocates it."""

  init = models.init_fn(model, model_cfg)

  def pick(rng):
    flat = traverse_util.flatten_dict(nn.meta.unbox(init(rng))["params"], sep="/")
    return {p: flat[p] for p in paths}

  return {p: np.asarray(v) for p, v in jax.jit(pick)(jax.random.key(seed)).items()}


def stitch_checkpoint(
  vision: str | os.PathLike,
  llm: str | os.PathLike,
  out: str | os.PathLike,
  *,
  variant: str = "d",
  dtype: str = "auto",
  image_token_id: int | None = None,
  xattn_every: int | None = None,
  xattn_offset: int | None = None,
  mesh: Mapping[str, int] | str | None = None,
  seed: int = 0,
  compression: str = "zstd",
  progress: bool = True,
) -> dict:
  """Writes the stitched model as one of our orbax checkpoints at `out`; returns a summary.

  image_token_id: the placeholder id (default: `<|vision_pad|>` of the LLM's tokenizer files, else
  vocab_size, one past the vocabulary: the models never look placeholders up). xattn_every /
  xattn_offset (X/H): cross-attention block placement (default: 10 blocks, config.CrossAttentionConfig).
  """

  start = time.perf_counter()
  out = refuse_existing(out)
  if variant not in VARIANTS:
    raise ConvertError(f"--variant {variant!r}; expected one of {sorted(VARIANTS)}")
  if dtype not in DTYPES:
    raise ConvertError(f"--dtype {dtype!r}; expected one of {DTYPES}")
  if variant == "d" and (xattn_every or xattn_offset is not None):
    raise ConvertError("--xattn-every / --xattn-offset apply to --variant x and h only")
  recipe = VARIANTS[variant]
  mesh = parse_mesh(mesh) if isinstance(mesh, str) else mesh
  llm_tower = _tower(llm, "llm", dtype)
  vision_tower = _tower(vision, "vision", dtype)
  storage = llm_tower.config.param_dtype if dtype == "auto" else dtype
  ids = tokenizer_ids(llm_tower.directory)
  if image_token_id is None:
    image_token_id = ids.get("image_token_id", llm_tower.config.vocab_size)
  xattn = None
  if xattn_every:
    xattn = CrossAttentionConfig(every=int(xattn_every), offset=xattn_offset)
  opts = StitchOptions(
    image_token_id=int(image_token_id),
    cross_attention=xattn,
    image_start_token_ids=tuple(ids.get("image_start_token_ids", ())),
  )
  try:
    cfg = recipe.build_config(_with_dtype(vision_tower.config, storage), _with_dtype(llm_tower.config, storage), opts)
  except ValueError as e:
    if isinstance(e, ConvertError):
      raise
    hint = " (set --xattn-every)" if variant in ("x", "h") else ""
    raise ConvertError(f"stitch: the towers do not fit together: {e}{hint}") from None
  model = models.module_for_config(cfg)
  boxed = models.abstract_variables(model, cfg)["params"]
  expected = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/").items()}
  layout = recipe.llm_layout(cfg)
  map_shapes, map_piece = layout if layout is not None else ((lambda shapes: dict(shapes)), None)
  provided = {**vision_tower.shapes, **map_shapes(llm_tower.shapes)}
  unknown = [p for p in provided if p not in expected]
  wrong = [
    f"{p}: source has {provided[p]}, the NVLM-{variant.upper()} model expects {expected[p]}"
    for p in provided
    if p in expected and tuple(provided[p]) != expected[p]
  ]
  if unknown or wrong:
    raise ConvertError(
      "stitch: the sources do not match the stitched model's parameters:\n  "
      + "\n  ".join((wrong + [f"{p}: not a parameter of the stitched model" for p in unknown])[:20])
    )
  fresh_paths = sorted(p for p in expected if p not in provided)
  fresh = fresh_params(model, cfg, fresh_paths, seed)
  if recipe.check_fresh is not None:
    recipe.check_fresh(fresh)
  bad = [p for p, v in fresh.items() if not np.all(np.isfinite(np.asarray(v, np.float32)))]
  if bad:
    raise ConvertError(f"stitch: fresh init produced non-finite values in {bad[:5]}")
  specs = orbax_stream.param_specs(boxed, storage, mesh_shape=mesh)
  fresh_bytes = sum(v.nbytes for v in fresh.values())

  def fresh_items():
    for path in fresh_paths:
      value = fresh.pop(path)
      yield WorkItem(label=path, nbytes=value.nbytes, run=lambda p=path, v=value: [(p, None, v)])

  with atomic_output_dir(out) as tmp:
    params_dir = orbax_stream.start_checkpoint(tmp, models.describe_model(cfg))
    total = vision_tower.nbytes + llm_tower.nbytes + fresh_bytes
    count = vision_tower.tensors + llm_tower.tensors + len(fresh_paths)
    bar = Progress(total, count, desc=f"stitch {out.name}", enabled=progress)
    try:
      with orbax_stream.ParamWriter(params_dir, specs, compression=compression) as writer:
        for items in (vision_tower.items(), _mapped(llm_tower.items(), map_piece), fresh_items()):
          stream_into(writer, items, bar)
        writer.close()
    finally:
      bar.close()
    orbax_stream.register_params_item(params_dir)
    side_files = copy_side_files(llm_tower.directory, tmp)
    summary = {
      "command": "stitch",
      "variant": variant,
      "vision": str(vision),
      "llm": str(llm),
      "dtype": storage,
      "image_token_id": cfg.image_token_id,
      "fresh_params": fresh_paths,
      "side_files": side_files,
      "mesh": mesh or {},
      "seconds": round(time.perf_counter() - start, 3),
    }
    write_provenance(tmp, summary)
  summary["out"] = str(out)
  return summary
