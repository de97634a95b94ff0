"""A workdir resumes only the run that wrote it (nvlm_jax/training/run_identity.py), the `:runlocal` recipes
never share a workdir, and a finished workdir does no work after "nothing to do"."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import pytest

from nvlm_jax.training import run_identity
from nvlm_jax.training.config_base import base_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (REPO / "configs").glob("nvlm_*.py"))


def recipe_config(name: str, arg=None):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_lm_config(workdir: Path, **changes):
  c = recipe_config("tiny_lm", "fast")
  c.workdir = str(workdir)
  c.total_steps = 2
  c.optimizer.warmup_steps = 1  # warmup must fit in the run (config_base.validate)
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.log.tensorboard = False
  c.compiler_options = {"xla_backend_optimization_level": 0}
  for key, value in changes.items():
    c[key] = value
  return c


def fake_checkpoint(workdir: Path) -> None:
  (workdir / "checkpoints" / "4").mkdir(parents=True)


def test_claim_records_the_run_and_accepts_it_again(tmp_path):
  c = base_config()
  c.recipe, c.model.preset, c.trainable = "nvlm_x_72b_pretrain:runlocal", "tiny_nvlm_x", ("*cross_attn*",)
  run_identity.claim(tmp_path, c)
  recorded = json.loads((tmp_path / run_identity.RUN_FILE).read_text())
  assert recorded == {"recipe": "nvlm_x_72b_pretrain:runlocal", "model": "tiny_nvlm_x", "trainable": ["*cross_attn*"]}
  fake_checkpoint(tmp_path)
  run_identity.claim(tmp_path, c)  # the same run resumes


def test_another_recipe_or_trainable_set_is_refused_with_both_named(tmp_path):
  first = base_config()
  first.recipe, first.model.preset, first.trainable = "nvlm_x_72b_pretrain:runlocal", "tiny_nvlm_x", ("*cross_attn*",)
  run_identity.claim(tmp_path, first)
  fake_checkpoint(tmp_path)
  second = base_config()
  second.recipe, second.model.preset = "nvlm_x_72b_sft:runlocal", "tiny_nvlm_x"
  second.trainable = ("*cross_attn*", "language_model")
  with pytest.raises(run_identity.RunIdentityError) as e:
    run_identity.claim(tmp_path, second)
  message = str(e.value)
  assert "nvlm_x_72b_pretrain:runlocal" in message and "nvlm_x_72b_sft:runlocal" in message
  assert "['*cross_attn*']" in message and "['*cross_attn*', 'language_model']" in message
  assert f"--config.checkpoint.init_from={tmp_path}" in message
  assert json.loads((tmp_path / run_identity.RUN_FILE).read_text())["recipe"] == "nvlm_x_72b_pretrain:runlocal"


def test_a_workdir_without_checkpoints_takes_the_new_run(tmp_path):
  """A run that died before its first checkpoint leaves nothing to protect."""
  first, second = base_config(), base_config()
  first.trainable, second.trainable = ("projector",), ("*",)
  run_identity.claim(tmp_path, first)
  run_identity.claim(tmp_path, second)
  assert json.loads((tmp_path / run_identity.RUN_FILE).read_text())["trainable"] == ["*"]


def test_every_runlocal_recipe_has_its_own_workdir_named_after_it():
  workdirs = {name: recipe_config(name, "runlocal").workdir for name in RECIPES}
  assert len(set(workdirs.values())) == len(RECIPES), workdirs
  for name, workdir in workdirs.items():
    assert workdir == f"/tmp/nvlm_runlocal_{name}", (name, workdir)


def test_train_py_names_the_recipe_after_the_config_flag():
  from nvlm_jax.training.run_identity import recipe_name

  assert recipe_name("configs/nvlm_x_72b_pretrain.py:runlocal") == "nvlm_x_72b_pretrain:runlocal"
  assert recipe_name("/abs/configs/tiny_d.py") == "tiny_d"


def test_trainer_refuses_another_run_and_does_no_work_after_nothing_to_do(tmp_path, capsys):
  from nvlm_jax.training.trainer import Trainer

  device = jax.devices()[:1]
  Trainer(tiny_lm_config(tmp_path), devices=device).run()
  capsys.readouterr()
  Trainer(tiny_lm_config(tmp_path), devices=device).run()  # finished: says so and compiles nothing
  out = capsys.readouterr().out
  assert "nothing to do" in out and "compiled" not in out
  with pytest.raises(run_identity.RunIdentityError, match="trainable"):
    Trainer(tiny_lm_config(tmp_path, trainable=("lm_head",), total_steps=4), devices=device).run()
