"""The recipe configs carry the paper's Tables 10/11, freeze the right modules, and plan on a mesh."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from nvlm_jax.training import optimizer, trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p.stem for p in CONFIGS.glob("nvlm_*_*_*.py"))

# docs/paper.md (g): (variant, stage) -> trainable top-level modules (D; X/H also "*cross_attn*"), optimizer, data.
TABLES = {
  ("d", "pretrain"): dict(
    lr=1e-4, min_lr=2.5e-5, warmup=500, b2=0.95, wd=0.1, clip=10.0, gbs=2048, seq=512, tiles=1, steps=20_000
  ),
  ("x", "pretrain"): dict(
    lr=1e-4, min_lr=1e-5, warmup=1000, b2=0.95, wd=0.05, clip=1.0, gbs=2048, seq=512, tiles=1, steps=20_000
  ),
  ("h", "pretrain"): dict(
    lr=1e-4, min_lr=1e-5, warmup=1000, b2=0.98, wd=0.05, clip=1.0, gbs=2048, seq=512, tiles=7, steps=20_000
  ),
  ("d", "sft"): dict(
    lr=2e-6, min_lr=2.5e-7, warmup=1000, b2=0.98, wd=0.1, clip=10.0, gbs=128, seq=3200, tiles=7, steps=40_000
  ),
  ("x", "sft"): dict(lr=1e-5, warmup=500, b2=0.98, wd=0.05, clip=1.0, seq=1024, tiles=7, steps=20_000),
  ("h", "sft"): dict(
    lr=1e-5, min_lr=1e-7, warmup=1000, b2=0.98, wd=0.05, clip=1.0, gbs=256, seq=1280, tiles=7, steps=40_000
  ),
}
TRAINABLE = {
  ("d", "pretrain"): {"projector"},
  ("d", "sft"): {"projector", "language_model"},
  ("x", "pretrain"): {"projector", "*cross_attn*"},
  ("x", "sft"): {"projector", "*cross_attn*", "language_model"},
  ("h", "pretrain"): {"projector", "*cross_attn*"},
  ("h", "sft"): {"projector", "*cross_attn*", "language_model"},
}


def load(name: str, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_every_size_variant_and_stage_has_a_recipe():
  assert RECIPES == sorted(f"nvlm_{v}_{s}_{t}" for v in "dxh" for s in ("72b", "34b") for t in ("pretrain", "sft"))
  for name in ("tiny_d", "tiny_x", "tiny_h", "tiny_lm"):
    assert load(name).total_steps > 0


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_values_match_the_paper_tables(name):
  _, variant, size, stage = name.split("_")
  c = load(name)
  want = dict(TABLES[(variant, stage)])
  if (variant, stage) == ("x", "sft"):  # the one size-dependent row of Table 11
    want.update(gbs=256 if size == "72b" else 512, min_lr=1e-7 if size == "72b" else 1e-6)
  got = dict(
    lr=c.optimizer.lr,
    min_lr=c.optimizer.min_lr,
    warmup=c.optimizer.warmup_steps,
    b2=c.optimizer.b2,
    wd=c.optimizer.weight_decay,
    clip=c.optimizer.grad_clip,
    gbs=c.data.global_batch_size,
    seq=c.data.seq_len,
    tiles=c.data.max_tiles,
    steps=c.total_steps,
  )
  assert {k: got[k] for k in want} == want
  assert c.optimizer.b1 == 0.9 and c.model.preset == f"nvlm_{variant}_{size}" and c.mesh.tensor == 8
  assert set(c.trainable) == TRAINABLE[(variant, stage)]
  assert not any("vision" in p for p in c.trainable)  # InternViT is frozen in every stage
  local = load(name, "runlocal")
  assert local.model.preset == f"tiny_nvlm_{variant}" and tuple(local.trainable) == tuple(c.trainable)


@pytest.mark.parametrize("name", [r for r in RECIPES if "_72b_" in r])
def test_recipe_freezes_exactly_the_untrained_modules_of_the_real_model(name):
  c = load(name)
  c.mesh.update(data=1, fsdp=1, tensor=8)
  setup = trainer.build_setup(c, devices=jax.devices()[:8])  # abstract only: the 72B model is never allocated
  paths = {optimizer.path_str(p): l for p, l in jax.tree_util.tree_leaves_with_path(setup.labels)}
  trained_top = {p.split("/")[0] for p, l in paths.items() if l == optimizer.TRAINABLE}
  assert "vision_model" not in trained_top
  in_llm = lambda p: p.startswith("language_model/") and "cross_attn" not in p
  if "language_model" in c.trainable:
    assert all(l == optimizer.TRAINABLE for p, l in paths.items() if p.startswith("language_model/"))
  else:
    assert all(l == optimizer.FROZEN for p, l in paths.items() if in_llm(p))
  if "*cross_attn*" in c.trainable:
    cross = [l for p, l in paths.items() if "cross_attn" in p]
    assert cross and all(l == optimizer.TRAINABLE for l in cross)
  if "projector" in c.trainable:
    assert all(l == optimizer.TRAINABLE for p, l in paths.items() if p.startswith("projector/"))
  else:
    assert all(l == optimizer.FROZEN for p, l in paths.items() if p.startswith("projector/"))
  moments = [optimizer.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(setup.abstract_state.opt_state)]
  assert not any("vision_model" in m for m in moments)
  params = {optimizer.path_str(p): a for p, a in jax.tree_util.tree_leaves_with_path(setup.abstract_state.params)}
  for path, array in params.items():
    if paths[path] == optimizer.TRAINABLE:
      assert array.dtype == np.dtype("float32"), path  # fp32 master weights for everything that trains
    elif path.startswith("vision_model/"):
      assert array.dtype == np.dtype("bfloat16"), path  # frozen: no fp32 copy


def test_planner_reports_memory_and_flops_for_a_sharded_tiny_model(capsys):
  from nvlm_jax.training import plan

  c = load("tiny_d")
  c.mesh.update(data=1, fsdp=4, tensor=2)
  c.compiler_options = {"xla_backend_optimization_level": 0}
  figures = plan.plan(c, flops_mode="raw", devices=jax.devices()[:8])
  out = capsys.readouterr().out
  assert "per-device memory" in out and "TFLOPs" in out
  assert figures["devices"] == 8 and figures["temp_bytes"] > 0 and figures["argument_bytes"] > 0
  assert figures["xla_tflops_per_device"] > 0 and figures["model_tflops_per_step"] > 0
  assert figures["params_bytes_per_device"] < 4 * figures["params"] / 2  # sharded, not replicated


def test_planner_extrapolated_xla_flops_agree_with_the_analytic_count():
  """XLA counts a scanned layer once; the 1-/2-layer extrapolation recovers the full count, which must
  match flops.py up to what the model formula leaves out (full instead of causal attention scores,
  norms, softmax, the optimizer)."""
  from nvlm_jax.training import plan

  c = load("tiny_lm")
  c.model.decoder.update(hidden_size=256, intermediate_size=1024, num_heads=8, num_kv_heads=4, num_layers=4)
  c.data.update(global_batch_size=8, seq_len=64, num_microbatches=2)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.compiler_options = {"xla_backend_optimization_level": 0}
  figures = plan.plan(c, devices=jax.devices()[:1])
  ratio = figures["xla_tflops_per_device_extrapolated"] / figures["model_tflops_per_step"]
  assert 0.95 < ratio < 1.25, ratio
  assert figures["xla_tflops_per_device"] < 0.6 * figures["xla_tflops_per_device_extrapolated"]


def test_planner_lowers_the_72b_sft_step_from_abstract_shapes(capsys):
  from nvlm_jax.training import plan

  c = load("nvlm_d_72b_sft")
  c.mesh.update(data=1, fsdp=1, tensor=8)
  c.data.global_batch_size, c.data.num_microbatches = 8, 1
  figures = plan.plan(c, lower_only=True, devices=jax.devices()[:8])
  assert 78e9 < figures["params"] < 80e9 and 73e9 < figures["trainable_params"] < 74e9
  # fp32 master weights of the 73B trainable parameters, split 8 ways by the tensor axis (mostly).
  assert 25 < figures["params_bytes_per_device"] / 2**30 < 60
