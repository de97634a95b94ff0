"""The held-out synthetic benchmark: ask a checkpoint every question of unseen samples of the built-in synthetic set.

    python eval.py --checkpoint WORKDIR --benchmark synthetic [--limit 500] [--batch-size 32] [--out DIR]

    summary = evaluate_checkpoint(workdir, num_samples=500)            # the run's own data settings
    rows, summary = evaluate_synthetic(model, params, processor, source={"size": "tiny"}, num_samples=500)

The samples are `SyntheticSource(num_samples, seed=HELD_OUT_SEED, **source)` (nvlm_jax/data/synthetic.py): one
fixed seed for every checkpoint, so all arms of a study answer the same questions, and a seed no training run
uses (`evaluate_checkpoint` refuses a checkpoint whose training config has a synthetic source with that seed;
samples of different seeds are independent draws). `source` holds the other SyntheticSource settings: by
default those of the checkpoint's own synthetic training source (size preset, tile_size, max_tiles,
text_only_fraction, ... read from WORKDIR/train_config.json); tile_size and max_tiles it leaves out default to
the processor's, as in training. Pass `source` explicitly to ask checkpoints trained with different settings
(another processor, say thumbnail-only) the same questions.

Every question of every sample is its own single-turn prompt: the synthetic set's system prompt, then the
image (`<image>` mark) and the question; text-only samples have no image. Decoding is greedy and stops at EOS;
an answer is right when the text before EOS, whitespace-stripped, equals the answer exactly (an answer cut
off at `max_new_tokens` before any EOS is wrong). `max_new_tokens` is the longest answer of the set in tokens
plus two (EOS and one spare), so decoding stops soon after any right answer could have ended.

Prediction rows: {"id", "sample_id", "type", "question", "answer", "prediction", "correct", "finished",
"num_prompt_tokens", "num_generated_tokens"}. The summary: {"benchmark", "metric", "accuracy" (fraction in
[0, 1]), "score" (100 x accuracy, as other benchmarks' summaries), "num_questions", "num_samples", "seed",
"per_type": {type: {"accuracy", "count"}}, "source" (every SyntheticSource setting used), "max_new_tokens",
timings}. per_type lists, in `QUESTION_TYPES` order, only the types that occur in the set (a thumbnail-only
source asks no tile question; a text_only_fraction of 0 gives no text_only one).

Speed: questions are sorted by prompt length and batched (generate_answers), so a batch holds images with
about the same number of tiles; prompts are left-padded to a multiple of `pad_to_multiple_of` and the last
batch is filled up, so a handful of programs is compiled once and reused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvlm_jax import models
from nvlm_jax.data import synthetic as synthetic_data
from nvlm_jax.data.pipeline import make_source
from nvlm_jax.evaluation import generate_answers as ga
from nvlm_jax.evaluation.benchmarks import Benchmark
from nvlm_jax.evaluation.predictions import write_predictions
from nvlm_jax.processing.chat_template import IMAGE_MARK
from nvlm_jax.training.run_config import read_train_config

NAME = "synthetic"
HELD_OUT_SEED = 1_000_000
DEFAULT_NUM_SAMPLES = 500
DEFAULT_PAD_TO_MULTIPLE_OF = 32
QUESTION_TYPES = synthetic_data.QUESTION_TYPES
# Entries of a data-config source that say how it is blended, not what it draws; the benchmark sets its own.
_BLEND_KEYS = ("kind", "weight", "name")
_SAMPLE_KEYS = ("num_samples", "seed")


class SyntheticBenchmarkError(ValueError):
  """The benchmark cannot run as asked (settings, seed); eval.py prints the message without a traceback."""


class HeldOutSeedError(SyntheticBenchmarkError):
  """The checkpoint was trained on synthetic samples of the held-out seed."""


# ----------------------------------------------------------------------------------- the questions


def _user_text(sample: Mapping[str, Any], suffix: str) -> str:
  return (f"{IMAGE_MARK}\n" if sample["images"] else "") + sample["question"] + suffix


def benchmark_for(max_new_tokens: int) -> Benchmark:
  """How generate_answers prompts a question: the synthetic set's system prompt, image mark + question."""
  return Benchmark(
    name=NAME,
    metric="exact match",
    source="nvlm_jax/data/synthetic.py",
    system_prompt=synthetic_data.SYSTEM_PROMPT,
    answer_suffix="",
    max_new_tokens=max_new_tokens,
    prompt_builder=_user_text,
  )


def held_out_source(source: Mapping[str, Any], num_samples: int, seed: int, processor=None):
  """The SyntheticSource of the benchmark; `source` holds SyntheticSource settings (a data-config source entry
  is accepted: kind / weight / name are dropped), tile_size / max_tiles default to the processor's."""
  settings = {k: v for k, v in dict(source).items() if k not in _BLEND_KEYS}
  clashing = sorted(k for k in _SAMPLE_KEYS if k in settings)
  if clashing:
    raise SyntheticBenchmarkError(
      f"synthetic benchmark source {dict(source)}: drop {clashing}; the benchmark sets the number of samples "
      "(num_samples / --limit) and the seed (held-out seed) itself"
    )
  if "kind" in source and source["kind"] != "synthetic":
    raise SyntheticBenchmarkError(f"synthetic benchmark source {dict(source)}: kind must be 'synthetic'")
  if num_samples < 1:
    raise SyntheticBenchmarkError(f"num_samples must be >= 1, got {num_samples}")
  try:
    return make_source({"kind": "synthetic", **settings, "num_samples": num_samples, "seed": seed}, processor)
  except ValueError as e:  # an unknown setting, or a bad value
    raise SyntheticBenchmarkError(f"synthetic benchmark source: {e}") from e


def source_settings(source) -> dict[str, Any]:
  """Every setting of a SyntheticSource except its length and seed (what the summary records)."""
  keys = (
    "size",
    "image_size_range",
    "tile_size",
    "max_tiles",
    "text_only_fraction",
    "small_text_px",
    "max_questions",
    "red_circle_fraction",
  )
  return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(source, k)) for k in keys)}


def questions_of(source) -> list[dict[str, Any]]:
  """One question per row, sample by sample: {"id", "sample_id", "type", "question", "answer", "images"}
  (images: the rendered scene, a PIL image, or nothing for a text-only sample)."""
  rows = []
  for index in range(len(source)):
    plan = source.plan(index)
    images = [] if plan.scene is None else [synthetic_data.render(plan.scene)]
    for k, ((question, answer), kind) in enumerate(zip(plan.qa, plan.types)):
      rows.append(
        {
          "id": f"{plan.id}:q{k}",
          "sample_id": plan.id,
          "type": kind,
          "question": question,
          "answer": answer,
          "images": images,
        }
      )
  return rows


def answer_budget(questions: Sequence[Mapping[str, Any]], tokenizer) -> int:
  """max_new_tokens: the longest answer in tokens, plus EOS and one spare token."""
  return max(len(tokenizer.encode(q["answer"])) for q in questions) + 2


# ----------------------------------------------------------------------------------- scoring


def is_correct(prediction: str, answer: str, finished: bool) -> bool:
  """Exact match of the whitespace-stripped answer, which must have ended with EOS."""
  return bool(finished) and prediction.strip() == answer.strip()


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """{"accuracy", "score", "num_questions", "per_type"} of scored prediction rows (see the module docstring)."""
  per_type = {}
  for kind in QUESTION_TYPES:
    hits = [r["correct"] for r in rows if r["type"] == kind]
    if hits:
      per_type[kind] = {"accuracy": sum(hits) / len(hits), "count": len(hits)}
  unknown = sorted({r["type"] for r in rows} - set(QUESTION_TYPES))
  if unknown:
    raise ValueError(f"prediction rows of unknown question types {unknown}; expected {QUESTION_TYPES}")
  accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
  return {"accuracy": accuracy, "score": 100.0 * accuracy, "num_questions": len(rows), "per_type": per_type}


def format_table(summary: Mapping[str, Any]) -> str:
  """The accuracy table eval.py prints: overall, then per question type."""
  lines = [f"{'type':<10} {'accuracy':>9} {'count':>6}"]
  lines.append(f"{'overall':<10} {100 * summary['accuracy']:>8.1f}% {summary['num_questions']:>6}")
  for kind, stats in summary["per_type"].items():
    lines.append(f"{kind:<10} {100 * stats['accuracy']:>8.1f}% {stats['count']:>6}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------- running


def evaluate_synthetic(
  model,
  params,
  processor,
  *,
  source: Mapping[str, Any],
  num_samples: int,
  batch_size: int = 32,
  seed: int = HELD_OUT_SEED,
  pad_to_multiple_of: int = DEFAULT_PAD_TO_MULTIPLE_OF,
  progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(prediction rows, summary) of `num_samples` samples of `source` drawn with `seed` (module docstring)."""
  if not ga.is_multimodal(model):
    raise SyntheticBenchmarkError(
      f"the synthetic benchmark asks about images; {type(model).__name__} is a text-only model (no vision config)"
    )
  data = held_out_source(source, num_samples, seed, processor)
  questions = questions_of(data)
  max_new_tokens = answer_budget(questions, processor.tokenizer)
  started = time.perf_counter()
  answers = ga.generate_answers(
    model,
    params,
    processor,
    benchmark_for(max_new_tokens),
    questions,
    batch_size=batch_size,
    max_new_tokens=max_new_tokens,
    pad_to_multiple_of=pad_to_multiple_of,
    progress=progress,
  )
  seconds = time.perf_counter() - started
  rows = []
  for question, answer in zip(questions, answers):
    rows.append(
      {
        **{k: question[k] for k in ("id", "sample_id", "type", "question", "answer")},
        "prediction": answer["prediction"],
        "correct": is_correct(answer["prediction"], question["answer"], answer["finished"]),
        **{k: answer[k] for k in ("finished", "num_prompt_tokens", "num_generated_tokens")},
      }
    )
  summary = {"benchmark": NAME, "metric": "exact match", **summarize(rows)}
  summary.update(
    {
      "num_samples": num_samples,
      "seed": seed,
      "source": source_settings(data),
      "max_new_tokens": max_new_tokens,
      "decoding": "greedy",
      "batch_size": batch_size,
      "num_unfinished": sum(not r["finished"] for r in rows),
      "generation_seconds": round(seconds, 2),
      "questions_per_second": round(len(rows) / max(seconds, 1e-9), 2),
    }
  )
  return rows, summary


def synthetic_training_sources(train_config: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The synthetic entries of a saved training config's data.sources (a list, or a mapping name -> entry),
  leaving out those of weight 0 (the pipeline never opens them)."""
  data = train_config.get("data") or {}
  if data.get("kind", "nvlm_pipeline") != "nvlm_pipeline":
    return []
  specs = data.get("sources") or []
  if isinstance(specs, Mapping):
    specs = list(specs.values())
  return [
    dict(s)
    for s in specs
    if isinstance(s, Mapping) and s.get("kind") == "synthetic" and float(s.get("weight", 1.0)) != 0
  ]


def check_held_out(train_sources: Sequence[Mapping[str, Any]], seed: int, where: str) -> None:
  """Raises HeldOutSeedError if a synthetic training source drew samples with the benchmark's seed."""
  for spec in train_sources:
    if int(spec.get("seed", 0)) == int(seed):
      raise HeldOutSeedError(
        f"{where}: the training data has a synthetic source with seed {seed}, the synthetic benchmark's held-out "
        f"seed ({spec}); its answers would be scored on samples it trained on. Train with another seed."
      )


def default_source(train_sources: Sequence[Mapping[str, Any]], where: str) -> dict[str, Any]:
  """The benchmark settings of a run's synthetic training source(s): all but blend keys, length and seed."""
  settings = [{k: v for k, v in s.items() if k not in _BLEND_KEYS + _SAMPLE_KEYS} for s in train_sources]
  if not settings:
    raise SyntheticBenchmarkError(
      f"{where}: the training data has no synthetic source to take the benchmark's settings from; pass "
      'source={"size": "tiny", ...} (eval.py --synthetic-source JSON)'
    )
  if any(s != settings[0] for s in settings[1:]):
    raise SyntheticBenchmarkError(
      f"{where}: the training data has synthetic sources with different settings {settings}; choose one with "
      "source= (eval.py --synthetic-source JSON)"
    )
  return settings[0]


def evaluate_checkpoint(
  path: str | os.PathLike,
  *,
  num_samples: int = DEFAULT_NUM_SAMPLES,
  batch_size: int = 32,
  source: Mapping[str, Any] | None = None,
  seed: int = HELD_OUT_SEED,
  out: str | os.PathLike | None = None,
  dtype: str | None = None,
  tokenizer: str | os.PathLike | None = None,
  pad_to_multiple_of: int = DEFAULT_PAD_TO_MULTIPLE_OF,
  progress: bool = False,
) -> dict[str, Any]:
  """The summary of the synthetic benchmark on a checkpoint (a training workdir / step dir, or a HF dir).

  source: SyntheticSource settings; default: the checkpoint's own synthetic training source (train_config.json).
  The held-out seed is checked against every synthetic training source the run recorded; a checkpoint that
  recorded none (a HF dir, an older run) is evaluated with an explicit `source` only, and its summary says
  "seed_check": "not verified". out: also write predictions.jsonl and summary.json there.
  """
  path = Path(path)
  try:
    train_config = read_train_config(ga.workdir_of(path)) if ga.is_training_checkpoint(path) else None
  except FileNotFoundError:
    train_config = None
  train_sources = synthetic_training_sources(train_config) if train_config is not None else []
  if train_config is not None:
    check_held_out(train_sources, seed, str(path))
  if source is None:
    if train_config is None:
      raise SyntheticBenchmarkError(
        f"{path}: no recorded training config (train_config.json) to take the benchmark's data settings from; "
        'pass source={"size": "tiny", ...} (eval.py --synthetic-source JSON)'
      )
    source = default_source(train_sources, str(path))
  held_out_source(source, num_samples, seed)  # bad settings fail here, before the model loads

  started = time.perf_counter()
  model, params = models.load_model(path, dtype=dtype)
  processor = ga.load_processor(path, model, tokenizer=tokenizer)
  load_seconds = time.perf_counter() - started
  rows, summary = evaluate_synthetic(
    model,
    params,
    processor,
    source=source,
    num_samples=num_samples,
    batch_size=batch_size,
    seed=seed,
    pad_to_multiple_of=pad_to_multiple_of,
    progress=progress,
  )
  summary.update(
    {
      "checkpoint": os.fspath(path),
      "model": type(model).__name__,
      "seed_check": "verified" if train_config is not None else "not verified (no recorded training config)",
      "load_seconds": round(load_seconds, 2),
    }
  )
  if out is not None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.jsonl", rows)
    summary["predictions_file"] = os.fspath(out / "predictions.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
  return summary
