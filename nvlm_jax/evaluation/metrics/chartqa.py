"""ChartQA relaxed accuracy.

ChartQA (Masry et al. 2022): "an answer is correct if it is within 5% of the gold answer; non-numeric
answers need an exact match". Two scorers:

* "official" (default): google-research/pix2struct `pix2struct/metrics.py::relaxed_correctness`, the
  definition behind published ChartQA numbers. Strings are used as given. Each side is a number when
  Python's `float()` reads it, where a trailing "%" divides by 100 ("50%" is 0.5). When both are
  numbers and the label is non-zero, the prediction is correct iff
  ``|pred - label| / |label| <= 5%`` (signs kept: "10" is wrong for "-10"); otherwise (a label of 0
  included) the two strings must be equal ignoring case. The best label wins.
* "megatron": NVLM's `examples/multimodal/evaluation/evaluate_vqav2.py::compute_vqa_accuracy` (task
  "ChartQA"): both sides VQA-normalized first (thousands separators deleted, "-" turned into a space, so
  signs are lost), a trailing "%" stripped, then ``0.95 * label <= pred <= 1.05 * label`` for numbers and
  string equality otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvlm_jax.evaluation.metrics.vqa import MEGATRON, OFFICIAL, normalize_vqa_answer


def _as_float(text: str) -> float | None:
  try:  # Python float() parsing, as both references (accepts " 7 ", "1e3", "inf", "1_000").
    return float(text)
  except ValueError:
    return None


def _official_number(text: str) -> float | None:
  if text.endswith("%"):
    value = _as_float(text.rstrip("%"))
    return None if value is None else value / 100.0
  return _as_float(text)


def relaxed_match(prediction: str, answer: str, tolerance: float = 0.05, scorer: str = OFFICIAL) -> bool:
  if scorer == OFFICIAL:
    pred_value, gold_value = _official_number(prediction), _official_number(answer)
    if pred_value is not None and gold_value:  # a label of 0 falls through to the string comparison
      return abs(pred_value - gold_value) / abs(gold_value) <= tolerance
    return prediction.lower() == answer.lower()
  if scorer == MEGATRON:
    pred = normalize_vqa_answer(prediction).rstrip("%")
    gold = normalize_vqa_answer(answer).rstrip("%")
    pred_value, gold_value = _as_float(pred), _as_float(gold)
    if pred_value is not None and gold_value is not None:
      return gold_value * (1.0 - tolerance) <= pred_value <= gold_value * (1.0 + tolerance)
    return pred == gold
  raise ValueError(f"unknown ChartQA scorer {scorer!r}; expected {OFFICIAL!r} or {MEGATRON!r}")


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05, scorer: str = OFFICIAL) -> float:
  """1.0 if the prediction relaxed-matches a label (ChartQA has exactly one)."""
  if not answers:
    raise ValueError("relaxed_accuracy needs a ground-truth answer")
  return float(any(relaxed_match(prediction, a, tolerance, scorer) for a in answers))
