"""The miniature studies: which recipe each arm trains, derived from the main job's configs.

Every arm of a study is the study's base recipe with ONE factor changed (`Arm.factor` names the config keys
it touches; tests/test_studies.py checks that nothing else differs). The base recipes are the demo configs
themselves, with only the schedule length shortened to the study's budget (`--steps`; warmup keeps the
demo's proportion), so a study follows whatever the main job becomes:

  D recipe   configs/tiny_d.py
  X, H       configs/tiny_d.py with the fusion's own model settings (preset, overrides, trainable modules)
             taken from configs/tiny_x.py / tiny_h.py: D, X and H then share one optimizer, data and
             schedule, and differ only in the fusion

The synthetic scenes of every arm are drawn with the same tile settings (the DHR grid of the base recipe:
56 px tiles, up to 6 + thumbnail), written into the source explicitly; left out, the data pipeline would take
them from the processor, and the low-resolution arm (one tile) would then be trained and asked about
different scenes. The held-out evaluation uses the same scene settings for every arm of a study.

`seed` changes the model init, the data order and the training source's sample seed; the held-out
evaluation's seed is the benchmark's own and never changes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Callable

import ml_collections

from nvlm_jax import models
from nvlm_jax.training.config_base import sibling_config

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
FUSION_KEYS = ("model.preset", "model.overrides", "trainable")  # what configs/tiny_{x,h}.py change for their fusion
TEXT_STAGE = "text_pretrain"  # the shared text-only first stage (x_frozen_llm, text_retention), cached under --out
# NVLM-X's LLM without its new cross-attention blocks (paper 4.5: the blocks are added to a trained LLM).
X_LLM_MODULES = (
  "language_model/embed_tokens",
  "language_model/final_norm",
  "language_model/lm_head",
  "language_model/decoder/groups/layers_*",
)
X_NEW_MODULES = ("projector", "*cross_attn*")


def demo_config(name: str) -> ml_collections.ConfigDict:
  """configs/<name>.py as the main job runs it."""
  path = CONFIGS_DIR / f"{name}.py"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: the studies derive their recipes from the repository's configs/ directory")
  return sibling_config(str(path), name)


def fusion_recipe(variant: str) -> ml_collections.ConfigDict:
  """The D demo recipe, with the fusion settings of configs/tiny_<variant>.py for X and H."""
  config = demo_config("tiny_d")
  if variant != "d":
    other = demo_config(f"tiny_{variant}")
    config.model.preset = other.model.preset
    config.model.overrides = copy.deepcopy(other.model.overrides)
    config.trainable = tuple(other.trainable)
  config.workdir = ""
  return config


def pin_scene_settings(config: ml_collections.ConfigDict) -> None:
  """Writes the DHR tile settings the scenes are drawn with into every synthetic source (see module doc)."""
  model_config = models.model_config_from_settings(config.model)
  for source in config.data.sources:
    if source.get("kind") == "synthetic":
      source.setdefault("tile_size", model_config.vision.image_size)
      source.setdefault("max_tiles", model_config.max_tiles)


def shorten(config: ml_collections.ConfigDict, steps: int) -> None:
  """The demo's schedule at `steps` optimizer steps (warmup in the demo's proportion; 2-3 checkpoints)."""
  demo_steps, demo_warmup = int(config.total_steps), int(config.optimizer.warmup_steps)
  config.total_steps = int(steps)
  config.optimizer.warmup_steps = max(1, min(steps, round(demo_warmup * steps / demo_steps)))
  config.optimizer.decay_steps = 0  # the whole run
  config.checkpoint.every_steps = max(1, math.ceil(steps / 3))
  config.checkpoint.max_to_keep = 2
  config.log.every_steps = max(1, min(int(config.log.every_steps), steps))
  config.log.tensorboard = False


def eval_source(config: ml_collections.ConfigDict) -> dict:
  """The scene settings of the held-out questions: the base recipe's synthetic source, minus what only
  training uses (sample count, seed, blend weight, name)."""
  sources = [dict(s) for s in config.data.sources if s.get("kind") == "synthetic"]
  if not sources:
    raise ValueError("the study's base recipe has no synthetic source: the studies evaluate on synthetic scenes")
  return {k: v for k, v in sources[0].items() if k not in ("kind", "num_samples", "seed", "weight", "name")}


def set_seed(config: ml_collections.ConfigDict, seed: int) -> None:
  """Model init, data order and the training source's samples all follow `seed`."""
  config.seed = int(seed)
  for source in config.data.sources:
    if source.get("kind") == "synthetic":
      source["seed"] = int(seed)


def _set_source(key: str, value) -> Callable[[ml_collections.ConfigDict], None]:
  def change(config):
    for source in config.data.sources:
      source[key] = value

  return change


def _tile_tags(tag_format: str) -> Callable[[ml_collections.ConfigDict], None]:
  def change(config):
    processor = config.data.get("processor", None)
    processor = dict(processor.to_dict() if hasattr(processor, "to_dict") else processor or {})
    processor["tile_tag_format"] = tag_format
    if "processor" in config.data:
      del config.data["processor"]
    config.data.processor = processor

  return change


def _low_resolution(config: ml_collections.ConfigDict) -> None:
  """One tile per image: the whole image at tile size (no DHR grid, hence no separate thumbnail)."""
  overrides = config.model.overrides.to_dict() if hasattr(config.model.overrides, "to_dict") else {}
  overrides["max_tiles"] = 1
  config.model.overrides = overrides
  config.data.max_tiles = 1


def _fusion(variant: str) -> Callable[[ml_collections.ConfigDict], None]:
  def change(config):
    fused = fusion_recipe(variant)
    for key in FUSION_KEYS:
      _assign(config, key, copy.deepcopy(_lookup(fused, key)))

  return change


def _trainable(patterns: tuple[str, ...] | None) -> Callable[[ml_collections.ConfigDict], None]:
  def change(config):
    if patterns is not None:
      config.trainable = tuple(patterns)

  return change


def _lookup(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _assign(config, dotted: str, value) -> None:
  *parents, last = dotted.split(".")
  for part in parents:
    config = config[part]
  if last in config:
    del config[last]
  config[last] = value


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  label: str  # the factor's setting in words (tables, plots)
  change: Callable[[ml_collections.ConfigDict], None]  # edits the study's base recipe: the factor only
  train: bool = True  # False: the arm is the shared text-pretrained checkpoint itself, evaluated as it is


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  title: str
  paper: str  # where docs/paper.md reports the corresponding result
  variant: str  # the base recipe's fusion: "d" | "x"
  factor: tuple[str, ...]  # the config keys the arms change (dotted; "data.sources.*.KEY" for source fields)
  arms: tuple[Arm, ...]
  default_steps: int
  default_eval_samples: int
  from_text_stage: bool = False  # every arm starts from the seed's text-pretrained LLM (TEXT_STAGE)

  def arm(self, name: str) -> Arm:
    for arm in self.arms:
      if arm.name == name:
        return arm
    raise KeyError(f"study {self.name!r} has no arm {name!r}; arms: {[a.name for a in self.arms]}")


def base_recipe(study: Study, *, steps: int) -> ml_collections.ConfigDict:
  """The recipe every arm of `study` starts from (before the arm's change, the seed and the workdir)."""
  config = fusion_recipe(study.variant)
  pin_scene_settings(config)
  shorten(config, steps)
  return config


def arm_recipe(
  study: Study, arm: Arm, *, steps: int, seed: int, workdir: str, init_from: str = ""
) -> ml_collections.ConfigDict:
  config = base_recipe(study, steps=steps)
  arm.change(config)
  set_seed(config, seed)
  config.workdir = workdir
  config.recipe = f"study_{study.name}_{arm.name}"
  if init_from:
    config.checkpoint.init_from = init_from
  return config


def text_stage_recipe(*, steps: int, seed: int, workdir: str) -> ml_collections.ConfigDict:
  """The first stage of x_frozen_llm and text_retention: NVLM-X's LLM trained on the synthetic set's
  text-only questions (the vision side and the new cross-attention blocks stay at their init). The paper
  starts every NVLM from a trained text LLM; a random one could answer nothing with its LLM frozen."""
  config = fusion_recipe("x")
  pin_scene_settings(config)
  shorten(config, steps)
  _set_source("text_only_fraction", 1.0)(config)
  config.trainable = X_LLM_MODULES
  set_seed(config, seed)
  config.workdir = workdir
  config.recipe = f"study_{TEXT_STAGE}"
  return config


TILE_TAG_ARMS = (
  Arm("no_tags", "no tile tags", _tile_tags("none")),
  Arm("tags_1d", "1-D tags <tile_k>", _tile_tags("1d")),
  Arm("tags_2d_grid", "2-D grid tags <tile_x_y>", _tile_tags("2d_grid")),
  Arm("tags_2d_bbox", "2-D bbox tags <box>", _tile_tags("2d_bbox")),
)

STUDIES = {
  s.name: s
  for s in (
    Study(
      "tile_tags",
      "Tile tags and dynamic high resolution in NVLM-D",
      "docs/paper.md (e), Table 1",
      "d",
      ("data.processor.tile_tag_format", "model.overrides", "data.max_tiles"),
      TILE_TAG_ARMS + (Arm("low_res", "low resolution (one tile, no DHR)", _low_resolution),),
      default_steps=250,
      default_eval_samples=150,
    ),
    Study(
      "x_tile_tags",
      "Tile tags in NVLM-X",
      "docs/paper.md (e), Table 2",
      "x",
      ("data.processor.tile_tag_format",),
      TILE_TAG_ARMS[:2],
      default_steps=400,
      default_eval_samples=200,
    ),
    Study(
      "fusion",
      "NVLM-D vs NVLM-X vs NVLM-H at the same number of steps",
      "docs/paper.md section 4.6, Table 3",
      "d",
      FUSION_KEYS,
      tuple(Arm(f"nvlm_{v}", f"NVLM-{v.upper()}", _fusion(v)) for v in ("d", "x", "h")),
      default_steps=250,
      default_eval_samples=150,
    ),
    Study(
      "x_frozen_llm",
      "NVLM-X SFT with the LLM frozen or trained",
      "docs/paper.md (g), Table 9",
      "x",
      ("trainable",),
      (
        Arm("llm_frozen", "LLM frozen (projector + cross-attention train)", _trainable(X_NEW_MODULES)),
        Arm("llm_unfrozen", "LLM trained too", _trainable(None)),
      ),
      default_steps=250,
      default_eval_samples=150,
      from_text_stage=True,
    ),
    Study(
      "text_retention",
      "Text-only accuracy before and after multimodal SFT, with and without text-only samples",
      "docs/paper.md (g), section 6 (text-only SFT data in the blend)",
      "x",
      ("data.sources.*.text_only_fraction",),
      (
        Arm("text_pretrained", "text-pretrained LLM (before multimodal SFT)", _trainable(None), train=False),
        Arm("sft_with_text", "multimodal SFT, 20 % text-only samples", _set_source("text_only_fraction", 0.2)),
        Arm("sft_without_text", "multimodal SFT, no text-only samples", _set_source("text_only_fraction", 0.0)),
      ),
      default_steps=250,
      default_eval_samples=150,
      from_text_stage=True,
    ),
  )
}


def get_study(name: str) -> Study:
  if name not in STUDIES:
    raise KeyError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
  return STUDIES[name]
