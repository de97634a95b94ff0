"""The held-out synthetic benchmark (`eval.py --benchmark synthetic`): question types, the held-out seed, and a
tiny NVLM-D trained here (real trainer, data pipeline) asked every question of a few held-out samples.

The oracle for what was asked is the synthetic generator's own plan of each held-out sample (every question,
its answer and type); the oracle for the types is the question templates, matched here independently of the
generator's labelling.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
from pathlib import Path

import jax
import pytest

from nvlm_jax.data import synthetic as data
from nvlm_jax.data.synthetic import SyntheticSource
from nvlm_jax.evaluation import synthetic
from nvlm_jax.studies import learning_curve
from nvlm_jax.training import run_config, trainer

ROOT = Path(__file__).resolve().parents[1]

# Each question template the generator fills in, as a pattern, with the type a reader would give it.
TEMPLATE_TYPES = {
  data.Q_NUMBER: "digits",
  data.Q_TILE: "tile",
  data.Q_COUNT: "count",
  data.Q_COLOR: "colour",
  data.Q_WORD: "word",
  data.Q_ADD: "text_only",
  data.Q_SUB: "text_only",
  data.Q_MUL: "text_only",
  data.Q_REPEAT: "text_only",
  data.Q_REVERSE: "text_only",
  data.Q_LENGTH: "text_only",
}


def _template_of(question: str) -> str:
  matches = [
    t for t in TEMPLATE_TYPES if re.fullmatch(re.sub(r"\\\{\w+\\\}", r"\\w+", re.escape(t)), question) is not None
  ]
  assert len(matches) == 1, (question, matches)
  return matches[0]


def test_question_types_label_every_question_kind_the_generator_emits():
  assert set(TEMPLATE_TYPES.values()) == set(synthetic.QUESTION_TYPES) == set(data.QUESTION_TYPES)
  source = SyntheticSource(400, seed=3, text_only_fraction=0.25, red_circle_fraction=0.8)
  seen = collections.Counter()
  for i in range(len(source)):
    plan = source.plan(i)
    assert len(plan.types) == len(plan.qa), plan.id
    for (question, _), kind in zip(plan.qa, plan.types):
      template = _template_of(question)
      assert kind == TEMPLATE_TYPES[template], (plan.id, question, kind)
      assert (kind == "text_only") == (plan.scene is None), (plan.id, question)
      seen[template] += 1
  assert set(seen) == set(TEMPLATE_TYPES), seen  # every kind of question was emitted, and labelled


def test_exact_match_needs_the_whole_answer_before_eos():
  assert synthetic.is_correct(" tile 3\n", "tile 3", finished=True)
  assert not synthetic.is_correct("tile 3", "tile 3", finished=False)  # cut off: the model had not stopped
  assert not synthetic.is_correct("tile 31", "tile 3", finished=True)
  rows = [
    {"type": "digits", "correct": True},
    {"type": "digits", "correct": False},
    {"type": "text_only", "correct": True},
  ]
  summary = synthetic.summarize(rows)
  assert summary["accuracy"] == pytest.approx(2 / 3) and summary["num_questions"] == 3
  assert summary["per_type"] == {"digits": {"accuracy": 0.5, "count": 2}, "text_only": {"accuracy": 1.0, "count": 1}}


def _load_module(name: str, path: Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TRAIN_SOURCE = {"kind": "synthetic", "weight": 1.0, "num_samples": 1000, "seed": 7, "size": "tiny"}
TEXT_ONLY_FRACTION = 0.4  # not the generator's default: the benchmark must take it from the run


@pytest.fixture(scope="module")
def tiny_d_workdir(tmp_path_factory) -> Path:
  """configs/tiny_d.py trained 2 steps (real trainer and data pipeline) on a synthetic source of seed 7,
  checkpointed after each step."""
  c = _load_module("tiny_d_config", ROOT / "configs" / "tiny_d.py").get_config()
  workdir = tmp_path_factory.mktemp("tiny_d")
  c.update(workdir=str(workdir), total_steps=2, compiler_options={"xla_backend_optimization_level": 0})
  c.optimizer.update(warmup_steps=1)
  c.data.update(global_batch_size=2, seq_len=160, max_tiles=3, read_threads=1, batch_prefetch=1)
  c.data.sources = [{**TRAIN_SOURCE, "text_only_fraction": TEXT_ONLY_FRACTION}]
  c.checkpoint.update(every_steps=1, max_to_keep=2, async_save=False)
  c.log.update(every_steps=1, tensorboard=False)
  trainer.Trainer(c, devices=jax.devices()[:1]).run()
  return workdir


NUM_SAMPLES = 6


def test_eval_py_asks_every_held_out_question_and_scores_it(tiny_d_workdir, tmp_path, capsys):
  eval_cli = _load_module("nvlm_eval_cli_synthetic", ROOT / "eval.py")
  out = tmp_path / "out"
  argv = ["--checkpoint", str(tiny_d_workdir), "--benchmark", "synthetic", "--limit", str(NUM_SAMPLES)]
  assert eval_cli.main(argv + ["--out", str(out), "--batch-size", "8", "--pad-to-multiple-of", "256"]) == 0
  printed = capsys.readouterr().out

  summary = json.loads((out / "summary.json").read_text())
  assert summary["seed"] == synthetic.HELD_OUT_SEED and summary["num_samples"] == NUM_SAMPLES
  assert summary["source"]["text_only_fraction"] == TEXT_ONLY_FRACTION  # the run's own data settings
  assert (summary["source"]["tile_size"], summary["source"]["max_tiles"]) == (56, 6)  # the processor's
  assert summary["seed_check"] == "verified"

  # What should have been asked: the generator's plan of each held-out sample, with the run's settings.
  expected = SyntheticSource(
    NUM_SAMPLES, synthetic.HELD_OUT_SEED, size="tiny", tile_size=56, max_tiles=6, text_only_fraction=TEXT_ONLY_FRACTION
  )
  asked = {}
  for i in range(NUM_SAMPLES):
    plan = expected.plan(i)
    for k, ((question, answer), kind) in enumerate(zip(plan.qa, plan.types)):
      asked[f"{plan.id}:q{k}"] = (question, answer, kind)
  rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert [r["id"] for r in rows] == list(asked)
  for row in rows:
    assert (row["question"], row["answer"], row["type"]) == asked[row["id"]]
    assert row["correct"] == (row["finished"] and row["prediction"].strip() == row["answer"]), row

  counts = collections.Counter(kind for _, _, kind in asked.values())
  assert summary["num_questions"] == len(asked)
  assert {k: v["count"] for k, v in summary["per_type"].items()} == dict(counts)
  assert list(summary["per_type"]) == [k for k in synthetic.QUESTION_TYPES if k in counts]
  for kind, stats in summary["per_type"].items():
    hits = [r["correct"] for r in rows if r["type"] == kind]
    assert stats["accuracy"] == pytest.approx(sum(hits) / len(hits))
  assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
  assert "overall" in printed and all(f"\n{kind} " in printed for kind in summary["per_type"])


def test_the_held_out_seed_is_refused_when_the_run_trained_on_it(tiny_d_workdir, tmp_path):
  assert run_config.read_train_config(tiny_d_workdir)["data"]["sources"][0]["seed"] == TRAIN_SOURCE["seed"]
  with pytest.raises(synthetic.HeldOutSeedError, match=r"seed 7, the synthetic benchmark's held-out seed"):
    synthetic.evaluate_checkpoint(tiny_d_workdir, num_samples=2, seed=TRAIN_SOURCE["seed"])
  with pytest.raises(ValueError, match=r"drop \['seed'\]"):
    synthetic.evaluate_checkpoint(tiny_d_workdir, num_samples=2, source={"size": "tiny", "seed": 3})
  eval_cli = _load_module("nvlm_eval_cli_synthetic", ROOT / "eval.py")
  argv = ["--checkpoint", str(tiny_d_workdir), "--benchmark", "synthetic", "--out", str(tmp_path)]
  with pytest.raises(SystemExit, match=r"eval.py: synthetic benchmark source: .*'colour_count'"):
    eval_cli.main(argv + ["--synthetic-source", '{"size": "tiny", "colour_count": 3}'])


def test_an_explicit_source_asks_other_checkpoints_the_same_questions(tiny_d_workdir, tmp_path):
  """Thumbnail-size images (one tile, no tile question) and no text-only samples, whatever the run drew."""
  source = {"size": "tiny", "image_size_range": (40, 56), "text_only_fraction": 0.0}
  summary = synthetic.evaluate_checkpoint(
    tiny_d_workdir, num_samples=3, batch_size=8, source=source, out=tmp_path, pad_to_multiple_of=256
  )
  assert summary["source"]["text_only_fraction"] == 0.0 and summary["source"]["image_size_range"] == [40, 56]
  assert set(summary["per_type"]) <= {"digits", "count", "colour", "word"}
  expected = SyntheticSource(3, synthetic.HELD_OUT_SEED, size="tiny", image_size_range=(40, 56), text_only_fraction=0)
  assert summary["num_questions"] == sum(len(expected.plan(i).qa) for i in range(3))


def test_learning_curve_evaluates_each_checkpoint_once(tiny_d_workdir, tmp_path, monkeypatch, capsys):
  out = tmp_path / "curve"
  assert learning_curve.main([str(tiny_d_workdir), "--samples", "2", "--out", str(out)]) == 0
  curve = json.loads((out / learning_curve.CURVE_FILE).read_text())
  assert list(curve) == ["1", "2"]  # every kept checkpoint, in step order
  direct = synthetic.evaluate_checkpoint(tiny_d_workdir / "checkpoints" / "2", num_samples=2)
  assert curve["2"]["accuracy"] == direct["accuracy"] and curve["2"]["per_type"] == direct["per_type"]
  assert curve["1"]["num_samples"] == 2 and (out / "learning_curve.png").stat().st_size > 0
  assert "step 1: overall" in capsys.readouterr().out

  def must_not_run(*args, **kwargs):
    raise AssertionError("a step already in the curve was evaluated again")

  monkeypatch.setattr(synthetic, "evaluate_checkpoint", must_not_run)
  assert learning_curve.main([str(tiny_d_workdir), "--samples", "2", "--out", str(out)]) == 0
  with pytest.raises(SystemExit):  # a workdir without checkpoints: a usage error naming the directory
    learning_curve.main([str(tmp_path / "empty"), "--out", str(out)])
  assert "no checkpoints" in capsys.readouterr().err
