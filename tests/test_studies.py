"""The miniature studies (nvlm_jax/studies): every arm changes only its study's factor; a toy study runs end to
end through the runner (training, evaluation, results.json, the plot), survives a failed run, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nvlm_jax.data import pipeline
from nvlm_jax.evaluation import synthetic
from nvlm_jax.studies import definitions, report
from nvlm_jax.studies.definitions import STUDIES, arm_recipe, base_recipe
from nvlm_jax.studies.runner import StudyRunner
from nvlm_jax.training.trainer import make_processor
from nvlm_jax import models


def _flat(value, prefix=""):
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  if isinstance(value, list):  # data.sources: one entry per source
    out = {}
    for i, v in enumerate(value):
      out.update(_flat(v, f"{prefix}{i}."))
    return out
  return {prefix[:-1]: value}


def _in_factor(key: str, factor: tuple[str, ...]) -> bool:
  for f in factor:
    pattern = f.replace("*", "")
    if f.startswith("data.sources.*."):
      parts = key.split(".")
      if key.startswith("data.sources.") and ".".join(parts[3:]) == f.split(".", 3)[3]:
        return True
    elif key == f or key.startswith(pattern + "."):
      return True
  return False


@pytest.mark.parametrize("name", list(STUDIES))
def test_arms_differ_from_the_base_recipe_only_in_the_studied_factor(name):
  study = STUDIES[name]
  base = _flat(base_recipe(study, steps=40))
  trained = []
  for arm in study.arms:
    config = base_recipe(study, steps=40)
    arm.change(config)
    flat = _flat(config)
    changed = {k for k in set(base) | set(flat) if base.get(k, "<absent>") != flat.get(k, "<absent>")}
    outside = sorted(k for k in changed if not _in_factor(k, study.factor))
    assert not outside, f"{name}/{arm.name} changes {outside} beyond the factor {study.factor}"
    if arm.train:
      trained.append(json.dumps(flat, sort_keys=True, default=str))
  assert len(set(trained)) == len(trained), f"{name}: two arms train the same recipe"

  # the seed and the workdir are the same kind of change for every arm; the schedule is the shortened demo's
  config = arm_recipe(study, study.arms[0], steps=40, seed=2, workdir="/w")
  assert config.seed == 2 and all(s["seed"] == 2 for s in config.data.sources) and config.total_steps == 40
  demo = definitions.demo_config("tiny_d")
  assert config.optimizer.lr == demo.optimizer.lr and config.data.seq_len == demo.data.seq_len


def test_low_resolution_arm_trains_on_the_same_scenes_as_the_tiled_arms():
  """Only the model's tiling changes: the synthetic records (scene, questions, tile answers) are identical."""
  study = STUDIES["tile_tags"]
  records = {}
  for arm_name in ("tags_1d", "low_res"):
    config = arm_recipe(study, study.arm(arm_name), steps=10, seed=0, workdir="")
    processor = make_processor(config, models.model_config_from_settings(config.model))[0]
    source = pipeline.make_source(config.data.sources[0], processor)
    records[arm_name] = [source[i] for i in range(12)]
    records[arm_name + "_tiles"] = processor.max_tiles_per_sample
  assert records["tags_1d"] == records["low_res"]
  assert any("Which tile" in str(r["messages"]) for r in records["low_res"])
  assert (records["tags_1d_tiles"], records["low_res_tiles"]) == (7, 1)


def test_text_stage_trains_the_llm_without_the_new_cross_attention_blocks():
  config = definitions.text_stage_recipe(steps=10, seed=1, workdir="/w")
  assert all(s["text_only_fraction"] == 1.0 for s in config.data.sources)
  from nvlm_jax.training import optimizer

  model_config = models.model_config_from_settings(config.model)
  params = models.abstract_variables(models.module_for_config(model_config), model_config)["params"]
  labels = optimizer.trainable_labels(params, config.trainable)
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in p): v
    for p, v in __import__("jax").tree_util.tree_leaves_with_path(labels)
  }
  assert flat and all(
    (v == "trainable") == (k.startswith("language_model") and "cross_attn" not in k) for k, v in flat.items()
  )


def test_spread_over_seeds():
  got = report.spread([0.2, 0.4, 0.9])
  assert got["mean"] == pytest.approx(0.5) and got["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
  assert (got["min"], got["max"], got["n"]) == (0.2, 0.9, 3)
  assert report.spread([0.3])["std"] == 0.0


TYPES = ("digits", "tile", "count", "colour", "word", "text_only")


def test_markdown_table_shows_each_arm_mean_and_std_in_percent():
  runs = {
    "nvlm_d": [
      {"seed": s, "accuracy": a, "per_type": {"tile": t}, "samples_per_s": v, "decoder_tokens_per_sample": 141.0}
      for s, a, t, v in ((0, 0.2, 0.5, 30.0), (1, 0.4, 0.7, 34.0))
    ],
    "nvlm_x": [
      {"seed": 0, "accuracy": 0.25, "per_type": {"tile": 0.3}, "samples_per_s": 20.0, "decoder_tokens_per_sample": 77.0}
    ],
  }
  study = definitions.get_study("fusion")
  summary = report.summarize(study, runs, failures=[], steps=10, eval_samples=5)
  lines = report.markdown_table(study, summary).splitlines()
  assert lines[0] == "| arm | seeds | overall | tile | samples per s | decoder tokens per sample |"
  std = 100 * np.std([0.2, 0.4], ddof=1)
  assert (
    lines[2]
    == f"| NVLM-D | 2 | 30.0 ± {std:.1f} | 60.0 ± {std:.1f} | 32.0 ± {np.std([30, 34], ddof=1):.1f} | 141.0 ± 0.0 |"
  )
  assert lines[3] == "| NVLM-X | 1 | 25.0 ± 0.0 | 30.0 ± 0.0 | 20.0 ± 0.0 | 77.0 ± 0.0 |"
  assert len(lines) == 4  # the arm with no finished run (NVLM-H) has no row
  no_speed = report.markdown_table(definitions.get_study("tile_tags"), {"arms": {}})
  assert no_speed.splitlines()[0] == "| arm | seeds | overall |"
  tile_tags = definitions.get_study("tile_tags")
  tagged = report.summarize(tile_tags, {"tags_1d": runs["nvlm_x"]}, failures=[], steps=10, eval_samples=5)
  # the arm's label "1-D tags <tile_k>": escaped, or a Markdown viewer hides <tile_k> as an HTML tag
  assert report.markdown_table(tile_tags, tagged).splitlines()[2].startswith("| 1-D tags \\<tile_k> | 1 |")


def _stand_in_scores(seed: int) -> dict:
  per_type = {t: {"accuracy": round(0.1 * (i + 1) + 0.05 * seed, 3), "count": 3 + i} for i, t in enumerate(TYPES)}
  return {"accuracy": 0.3 + 0.1 * seed, "num_questions": 33, "num_samples": 5, "seed": 10**6, "per_type": per_type}


@pytest.fixture
def stand_in_benchmark(monkeypatch):
  """The synthetic benchmark (nvlm_jax.evaluation.synthetic.evaluate_checkpoint, tested in test_eval_synthetic.py)
  replaced by known scores per seed, so the aggregation can be checked; it checks that it is handed a trained
  checkpoint and the study's scene settings."""
  calls, fail_seeds = [], set()

  def evaluate_checkpoint(path, *, num_samples=500, batch_size=32, source=None):
    seed = int(Path(path).name.removeprefix("seed_"))
    calls.append((path, num_samples, source))
    if seed in fail_seeds:
      raise RuntimeError("stand-in benchmark failure")
    assert (Path(path) / "checkpoints" / "2").is_dir(), f"{path} is not trained to step 2"
    return _stand_in_scores(seed)

  monkeypatch.setattr(synthetic, "evaluate_checkpoint", evaluate_checkpoint)
  return calls, fail_seeds


def _toy(config):
  config.compiler_options = {"xla_backend_optimization_level": 0}
  config.checkpoint.async_save = False
  config.checkpoint.every_steps = 2  # one save per run


@pytest.mark.slow  # 30-40 s on the shared 2 cores: two tiny D trainings on 8 devices, a resume, the plot
def test_a_study_arm_end_to_end_with_a_failure_and_resume(tmp_path, stand_in_benchmark, capsys):
  calls, fail_seeds = stand_in_benchmark
  lines = []

  def runner():
    return StudyRunner(
      "tile_tags", tmp_path, seeds=2, steps=2, eval_samples=5, arms=["tags_1d"], config_hook=_toy, say=lines.append
    )

  fail_seeds.add(1)  # seed 1's evaluation fails: seed 0's result must survive, the failure named
  summary = runner().run()
  assert summary["failures"] == [{"arm": "tags_1d", "seed": 1, "error": "RuntimeError: stand-in benchmark failure"}]
  assert any("run 2/2 tags_1d seed 1] FAILED" in line for line in lines)
  study_dir = tmp_path / "tile_tags"
  assert (study_dir / "runs" / "tags_1d" / "seed_0.json").is_file()
  assert not (study_dir / "runs" / "tags_1d" / "seed_1.json").exists()
  demo = definitions.demo_config("tiny_d")  # the held-out scenes: the main job's, with its DHR tile settings
  scenes = {k: v for k, v in demo.data.sources[0].items() if k not in ("kind", "num_samples", "seed", "weight")}
  model_config = models.model_config_from_settings(demo.model)
  scenes.update(tile_size=model_config.vision.image_size, max_tiles=model_config.max_tiles)
  assert calls[0][1:] == (5, scenes) and scenes["max_tiles"] == 6

  fail_seeds.clear()
  lines.clear()
  capsys.readouterr()
  summary = runner().run()  # seed 0 skipped; seed 1 resumes its finished training and is evaluated
  assert any("seed 0] done already" in line for line in lines)
  assert "resumed from" in capsys.readouterr().out
  assert [Path(c[0]).name for c in calls] == ["seed_0", "seed_1", "seed_1"]

  results = json.loads((study_dir / "results.json").read_text())
  assert results == json.loads(json.dumps(summary)) and results["failures"] == []
  arm = results["arms"]["tags_1d"]
  assert arm["seeds"] == [0, 1]
  known = [_stand_in_scores(0), _stand_in_scores(1)]
  overall = [k["accuracy"] for k in known]
  assert arm["aggregate"]["accuracy"]["mean"] == pytest.approx(np.mean(overall))
  assert arm["aggregate"]["accuracy"]["std"] == pytest.approx(np.std(overall, ddof=1))
  for t in TYPES:
    values = [k["per_type"][t]["accuracy"] for k in known]
    got = arm["aggregate"]["per_type"][t]
    assert (got["mean"], got["std"]) == pytest.approx((np.mean(values), np.std(values, ddof=1)))
    assert (got["min"], got["max"]) == (min(values), max(values))
  run = arm["runs"][0]
  assert run["steps"] == 2 and run["samples_per_s"] > 0 and run["decoder_tokens_per_sample"] > 16
  png = study_dir / "tile_tags.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (study_dir / "tile_tags.md").read_text() == report.markdown_table(definitions.get_study("tile_tags"), summary)

  lines.clear()
  runner().run()  # everything finished: nothing trains, nothing is asked again
  assert len(calls) == 3 and sum("done already" in line for line in lines) == 2


def _must_not_train(config):
  pytest.fail(f"{config.workdir} would train")


def test_a_rerun_with_other_settings_is_refused(tmp_path):
  """Finished runs of another --steps / --eval-samples would be skipped and mixed into one table."""
  result = tmp_path / "fusion" / "runs" / "nvlm_d" / "seed_0.json"
  result.parent.mkdir(parents=True)
  result.write_text(json.dumps({"seed": 0, "steps": 60, "eval_samples": 100}))
  StudyRunner("fusion", tmp_path, seeds=1, steps=60, eval_samples=100).check_finished_runs()
  with pytest.raises(ValueError, match=r"seed_0.json \(--steps 60, --eval-samples 100\)"):
    StudyRunner("fusion", tmp_path, seeds=1, steps=250, eval_samples=100, config_hook=_must_not_train).run()
