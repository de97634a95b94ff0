"""`score_predictions`: predictions (merged with their samples) -> a benchmark summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nvlm_jax.evaluation.benchmarks import Benchmark, get_benchmark
from nvlm_jax.evaluation.schema import validate_sample


def _checked_rows(benchmark: Benchmark, predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  rows, seen = [], set()
  for index, prediction in enumerate(predictions):
    where = f"{benchmark.name} prediction #{index} (id {prediction.get('id')!r})"
    if "prediction" not in prediction:
      raise ValueError(f"{where}: no 'prediction' field")
    # Scoring needs neither the images nor (except where required) the question text.
    sample, problems = validate_sample({"images": [], "question": "", **prediction})
    if problems:
      raise ValueError(f"{where}: " + "; ".join(problems))
    missing = [
      f
      for f in benchmark.required_fields
      if (f == "answers" and not sample["answers"]) or (f != "answers" and f not in prediction)
    ]
    if missing:
      raise ValueError(
        f"{where}: missing {missing} needed to score {benchmark.name} "
        "(unlabelled test splits are scored by the benchmark's server)"
      )
    if sample["id"] in seen:
      raise ValueError(f"{where}: duplicate id")
    seen.add(sample["id"])
    rows.append(sample)
  return rows


def _total(scores: Sequence[float], aggregate: str) -> float:
  if aggregate == "sum":
    return float(sum(scores))
  return 100.0 * sum(scores) / len(scores) if scores else 0.0


def score_predictions(
  benchmark: str | Benchmark, predictions: Sequence[Mapping[str, Any]], per_sample: bool = False, **metric_options: Any
) -> dict[str, Any]:
  """Score predictions that carry their sample's fields (see `merge_predictions`).

  Returns {"benchmark", "metric", "score", "num_samples", "per_category", ...}: "score" is 100 x the
  mean per-sample score (OCRBench: the point total); "per_category" the same per category (a sample
  with a list of categories counts in each). Benchmark-specific extras: MMMU "per_domain", OCRBench
  "components", MathVista "num_rule_based_extractions", HumanEval "pass_at_k". per_sample=True adds
  {"id": score} as "per_sample". `metric_options` go to the benchmark's metric (e.g. scorer="megatron",
  threshold=0.5; `benchmark_help()` lists them).
  """
  benchmark = get_benchmark(benchmark)
  rows = _checked_rows(benchmark, predictions)
  scores, extras = benchmark.score(rows, **metric_options)

  by_category: dict[str, list[float]] = {}
  for row, score in zip(rows, scores):
    categories = benchmark.category_of(row)
    for category in [categories] if isinstance(categories, str) else categories or ():
      by_category.setdefault(category, []).append(score)

  summary: dict[str, Any] = {
    "benchmark": benchmark.name,
    "metric": benchmark.metric,
    "score": _total(scores, benchmark.aggregate),
    "num_samples": len(rows),
    "per_category": {c: _total(v, benchmark.aggregate) for c, v in sorted(by_category.items())},
  }
  if benchmark.summarize_categories is not None:
    summary.update(benchmark.summarize_categories(by_category))
  summary.update(extras)
  if per_sample:
    summary["per_sample"] = {row["id"]: score for row, score in zip(rows, scores)}
  return summary
