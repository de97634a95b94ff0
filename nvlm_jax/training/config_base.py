"""The defaults every training config starts from (configs/*.py call `base_config()` and set the rest).

Keys (all overridable on the command line, e.g. `--config.optimizer.lr=1e-5`):

  workdir                 checkpoints, metrics.jsonl, tensorboard/ (resumes from the latest checkpoint here;
                          it resumes only the run that wrote it: run_identity.py)
  recipe                  the config's name, recorded in the workdir (train.py sets it from --config, e.g.
                          "nvlm_x_72b_pretrain:runlocal")
  seed                    parameter init and data order
  total_steps             optimizer steps (one global batch each)
  trainable               parameter path patterns that train (optimizer.py); everything else is frozen
  max_consecutive_nonfinite   abort after this many NaN/Inf steps in a row (each one is skipped)
  compiler_options        XLA options for the jitted init/step, e.g. {"xla_backend_optimization_level": 0}
  model.preset            a name in nvlm_jax.presets ("nvlm_d_72b", "tiny_nvlm_d", ...) -- or
  model.decoder           a DecoderConfig as a dict (text-only LM mode)
  model.dtype / param_dtype   compute / master-weight dtype of every tower ("" = the preset's)
  model.remat.{vision,llm}    remat policy per tower ("" = the preset's; "full", "dots", ...)
  model.overrides         nested dict of config fields, e.g. {"llm": {"num_layers": 4}}
  optimizer.*             AdamW: lr (peak), min_lr, warmup_steps, decay_steps (0 = total_steps), b1, b2,
                          eps, weight_decay, grad_clip (global norm; 0 = off)
  data.kind               "nvlm_pipeline" (nvlm_jax.data.pipeline) | "synthetic_lm" (text-only, synthetic)
  data.global_batch_size  rows per step over all processes; data.seq_len: decoder tokens per row
  data.max_tiles          tile slots per row (6 + thumbnail = 7); data.num_microbatches: gradient accumulation
  data.tile_budget        ViT tiles encoded per step (0 = every slot; see nvlm_jax/vision/pathway.py)
  data.tokenizer_bos_token  a BOS token for the "tiny_synthetic" tokenizer (runlocal of Yi-format recipes)
  mesh.{data,fsdp,tensor} device mesh (one axis may be -1: all remaining devices)
  sharding_rules          (logical axis, mesh axes) pairs placing every parameter and activation on the mesh
                          (default: nvlm_jax.sharding.LOGICAL_AXIS_RULES)
  checkpoint.*            every_steps, max_to_keep, async_save, init_from (HF checkpoint or our workdir)
  log.*                   every_steps, tensorboard, peak_tflops_per_device (for MFU; 0 = do not report)
  distributed.*           coordinator_address ("" = single process; "auto" = cluster autodetect),
                          num_processes, process_id (-1 = from env), num_cpu_devices (CPU tests)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from nvlm_jax import sharding
from nvlm_jax.training import optimizer

# Dense bf16 peak of common accelerators, TFLOP/s per device (for `log.peak_tflops_per_device`).
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "tpu_v5p": 459.0, "tpu_v5e": 197.0, "cpu": 0.0}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "/tmp/nvlm_train"
  c.recipe = ""
  c.seed = 0
  c.total_steps = 1000
  c.trainable = ("*",)
  c.max_consecutive_nonfinite = 5
  c.compiler_options = ml_collections.ConfigDict()  # XLA options for the jitted init and step

  c.model = ml_collections.ConfigDict()
  c.model.preset = ""
  c.model.decoder = ml_collections.ConfigDict()
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = ml_collections.ConfigDict({"vision": "", "llm": ""})
  c.model.overrides = ml_collections.ConfigDict()

  c.optimizer = ml_collections.ConfigDict(
    {
      "lr": 1e-4,
      "min_lr": 1e-5,
      "warmup_steps": 100,
      "decay_steps": 0,
      "b1": 0.9,
      "b2": 0.95,
      "eps": 1e-8,
      "weight_decay": 0.1,
      "grad_clip": 1.0,
    }
  )

  c.data = ml_collections.ConfigDict(
    {
      "kind": "nvlm_pipeline",
      "global_batch_size": 8,
      "seq_len": 512,
      "max_tiles": 1,
      "num_microbatches": 1,
      "tile_budget": 0,
    }
  )

  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.sharding_rules = sharding.LOGICAL_AXIS_RULES
  c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "max_to_keep": 3, "async_save": True, "init_from": ""})
  c.log = ml_collections.ConfigDict({"every_steps": 10, "tensorboard": True, "peak_tflops_per_device": 0.0})
  c.distributed = ml_collections.ConfigDict(
    {"coordinator_address": "", "num_processes": 0, "process_id": -1, "num_cpu_devices": 0}
  )
  return c


# The tiny demo tokenizer's vocabulary (nvlm_jax.processing.tokenizer, tiny_synthetic); its token ids
# (image placeholder, `<Image>`) reach the model config from the processor (processor_setup.sync_model_config).
TINY_TOKENIZER_OVERRIDES = {"llm": {"vocab_size": 512}}


def synthetic_data(c: ml_collections.ConfigDict, *, seq_len: int, max_tiles: int, global_batch_size: int) -> None:
  """Points `c.data` at the built-in synthetic image QA set with the tiny demo tokenizer."""
  c.data.kind = "nvlm_pipeline"
  c.data.tokenizer = "tiny_synthetic"
  if "sources" in c.data:  # a recipe's sources may be a mapping (configs/sft_blend.py): replace, not cast
    del c.data["sources"]
  c.data.sources = [
    {"kind": "synthetic", "weight": 1.0, "num_samples": 100_000, "seed": 0, "size": "tiny", "text_only_fraction": 0.2}
  ]
  c.data.global_batch_size = global_batch_size
  c.data.seq_len = seq_len
  c.data.max_tiles = max_tiles
  c.data.num_microbatches = 1
  c.data.tile_budget = 0


def runlocal(c: ml_collections.ConfigDict, tiny_preset: str) -> ml_collections.ConfigDict:
  """A recipe shrunk to run on a laptop CPU in a minute (big_vision's `runlocal`): same stage (trainable
  modules, optimizer shape, tile settings), tiny model, synthetic data, few steps. Select it with
  `--config=configs/RECIPE.py:runlocal`. Its workdir is /tmp/nvlm_runlocal_RECIPE (every recipe's own workdir
  is /tmp/RECIPE), so two stages never share one."""
  c.model.preset = tiny_preset
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.remat = {"vision": "", "llm": ""}
  c.model.overrides = dict(TINY_TOKENIZER_OVERRIDES)
  processor = c.data.get("processor", None)
  if processor is not None and processor.get("chat_format") == "nvlm-yi-34b":
    c.data.tokenizer_bos_token = "<|endoftext|>"  # the tiny tokenizer has no BOS; Yi's format needs one
  synthetic_data(c, seq_len=256 if c.data.max_tiles > 1 else 128, max_tiles=c.data.max_tiles, global_batch_size=8)
  if processor is not None:
    c.data.processor = processor
  c.data.worker_count = 0  # a laptop: grain worker processes would cost more to start than they save
  c.optimizer.lr, c.optimizer.min_lr = 1e-3, 1e-4
  c.optimizer.warmup_steps, c.optimizer.decay_steps = 5, 0
  c.total_steps = 20
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.checkpoint.init_from = ""
  c.checkpoint.every_steps = 10
  c.log.every_steps = 5
  c.log.peak_tflops_per_device = 0.0
  c.workdir = f"/tmp/nvlm_runlocal_{Path(c.workdir).name}"
  return c


def missing_config_file(flag) -> str | None:
  """For a `config_flags.DEFINE_config_file` flag: a message naming the file if it does not exist (ml_collections
  would report a failure to load "config_config"), else None."""
  from ml_collections import config_flags

  if flag.value is None and not flag.present:
    return None
  path = (config_flags.get_config_filename(flag) or "").split(":")[0]
  return None if Path(path).is_file() else f"--config: config file {path} does not exist"


def check_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every setting that cannot work (each named with its value), before anything
  is built or compiled: a bad value must not surface as a crash deep in orbax or a silent no-op run."""

  problems = []

  def at_least(name, value, low, why=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      problems.append(f"config.{name}={value!r}: must be an integer >= {low}{why}")

  at_least("total_steps", c.get("total_steps"), 1)
  at_least("max_consecutive_nonfinite", c.get("max_consecutive_nonfinite", 5), 1)
  at_least("checkpoint.every_steps", c.checkpoint.get("every_steps"), 1)
  at_least("checkpoint.max_to_keep", c.checkpoint.get("max_to_keep"), 1)
  at_least("log.every_steps", c.log.get("every_steps", 1), 1)
  at_least("data.global_batch_size", c.data.get("global_batch_size"), 1)
  at_least("data.seq_len", c.data.get("seq_len"), 1)
  at_least("data.num_microbatches", c.data.get("num_microbatches", 1), 1)
  problems += optimizer.settings_problems(c.optimizer, c.get("total_steps"))
  if problems:
    raise ValueError("invalid training settings:\n  " + "\n  ".join(problems))


def sibling_config(this_file: str, name: str, arg=None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of configs/<name>.py beside `this_file`: a recipe that is another one with a few
  changes says so by starting from it, instead of repeating it."""
  path = Path(this_file).with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"nvlm_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def on_yi_34b(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A 72B recipe moved to the 34B backbone (Nous-Hermes-2-Yi-34B): the paper's Tables 10/11 give one
  column per variant, so only the model, the paths and Yi's prompt settings change (plus any cell the
  tables split by size)."""
  c.model.preset = c.model.preset.replace("72b", "34b")
  # Yi-34B's prompt format (with BOS) and thumbnail tag, as the paper's 34B models (Megatron `nvlm-yi-34b`).
  if c.data.get("processor", None) is not None:
    c.data.processor.chat_format = "nvlm-yi-34b"
    c.data.processor.global_tile_tag = "<tile_global>"
  c.workdir = c.workdir.replace("72b", "34b")
  c.checkpoint.init_from = c.checkpoint.init_from.replace("72b", "34b")
  if c.data.get("tokenizer", "") == "/ckpt/Qwen2-72B-Instruct":
    c.data.tokenizer = "/ckpt/Nous-Hermes-2-Yi-34B"
  return c
