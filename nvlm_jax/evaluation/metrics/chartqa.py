"""ChartQA relaxed accuracy.

ChartQA (Masry et al. 2022): "an answer is correct if it is within 5% of the gold answer; non-numeric
answers need an exact match". Implemented as NVLM's Megatron scorer does it
(`examples/multimodal/evaluation/evaluate_vqav2.py::compute_vqa_accuracy`, task "ChartQA"):
prediction and label are first VQA-normalized (which, among other things, deletes thousands
separators and turns "-" into a space), a trailing "%" is stripped from both, then numbers are
compared with the 5% band and everything else by string equality.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvlm_jax.evaluation.metrics.vqa import normalize_vqa_answer


def _as_float(text: str) -> float | None:
  try:  # Python float() parsing, as the reference (accepts "1e3", "inf", "1_000").
    return float(text)
  except ValueError:
    return None


def relaxed_match(prediction: str, answer: str, tolerance: float = 0.05) -> bool:
  pred = normalize_vqa_answer(prediction).rstrip("%")
  gold = normalize_vqa_answer(answer).rstrip("%")
  pred_value, gold_value = _as_float(pred), _as_float(gold)
  if pred_value is not None and gold_value is not None:
    # Megatron tests 0.95*gt <= pred <= 1.05*gt; ordering the bounds keeps that exact for
    # gt >= 0 and makes the band meaningful for a negative gt (pix2struct's relative-change rule).
    low, high = sorted((gold_value * (1.0 - tolerance), gold_value * (1.0 + tolerance)))
    return low <= pred_value <= high
  return pred == gold


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
  """1.0 if the prediction relaxed-matches the label (ChartQA has exactly one; with more, any)."""
  if not answers:
    raise ValueError("relaxed_accuracy needs a ground-truth answer")
  return float(any(relaxed_match(prediction, a, tolerance) for a in answers))
