"""Predictions JSONL: one ``{"id": ..., "prediction": ...}`` object per generated answer.

"prediction" is a string, or a list of strings when several completions were sampled per problem
(HumanEval pass@k). Other keys are kept; a prediction row may also carry the sample's own fields
(answers, options, ...) so that it can be scored without the data file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nvlm_jax.evaluation.schema import Sample, read_checked_jsonl, write_jsonl


class PredictionsError(ValueError):
  """A predictions file or list is malformed or does not match the samples."""


def _prediction_problem(obj: Any) -> str | None:
  if not isinstance(obj, dict):
    return f"expected a JSON object, found {type(obj).__name__}"
  if not isinstance(obj.get("id"), str) or not obj["id"]:
    return f"'id' must be a non-empty string, found {obj.get('id')!r}"
  prediction = obj.get("prediction")
  if isinstance(prediction, str):
    return None
  if isinstance(prediction, list) and prediction and all(isinstance(p, str) for p in prediction):
    return None
  return f"'prediction' must be a string or a non-empty list of strings, found {type(prediction).__name__}"


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Read and validate a predictions JSONL file (unique ids); errors name file:line."""

  def check(obj: Any) -> tuple[dict[str, Any] | None, list[str]]:
    problem = _prediction_problem(obj)
    return (None, [problem]) if problem else (obj, [])

  return read_checked_jsonl(path, check, PredictionsError, "prediction")


def write_predictions(path: str | os.PathLike, predictions: Iterable[Mapping[str, Any]]) -> int:
  """Write predictions (validated) as JSONL; return the number written."""
  rows = []
  for index, row in enumerate(predictions):
    problem = _prediction_problem(dict(row))
    if problem:
      raise PredictionsError(f"prediction #{index} for {os.fspath(path)}: {problem}")
    rows.append(row)
  return write_jsonl(path, rows)


def merge_predictions(
  predictions: Sequence[Mapping[str, Any]], samples: Sequence[Sample], allow_missing: bool = False
) -> list[dict[str, Any]]:
  """Attach each prediction to its sample (sample fields win over copies in the prediction row).

  Raises if a prediction's id is not a sample id, or, unless allow_missing, if a sample has no
  prediction. The result follows the samples' order.
  """
  by_id = {row["id"]: row for row in predictions}
  known = {s["id"] for s in samples}
  unknown = [i for i in by_id if i not in known]
  if unknown:
    raise PredictionsError(f"{len(unknown)} prediction id(s) not in the samples, e.g. {unknown[:5]}")
  missing = [s["id"] for s in samples if s["id"] not in by_id]
  if missing and not allow_missing:
    raise PredictionsError(
      f"{len(missing)} sample(s) have no prediction, e.g. {missing[:5]} "
      "(pass allow_missing=True to score only the predicted ones)"
    )
  return [{**by_id[s["id"]], **s} for s in samples if s["id"] in by_id]
