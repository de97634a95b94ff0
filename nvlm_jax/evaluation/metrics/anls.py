"""ANLS (Average Normalized Levenshtein Similarity) for DocVQA and InfographicVQA.

Two scorers (Biten et al. 2019 define the metric; the details below decide borderline answers):

* "official" (default): the RRC DocVQA/InfographicVQA server script (a copy ships with OpenGVLab/InternVL
  as `eval/vqa/infographicsvqa_eval.py`). Per ground truth the edit distance is taken between the cleaned
  strings (stripped, lower-cased, whitespace runs -> one space) but divided by the longer length of the
  *raw* strings after `str.upper()`, so padding whitespace lowers NL and "İ" (one character, two after
  `lower()`) can push it above 1. The sample scores ``1 - min NL`` and counts 0 only when that is
  *below* the threshold: NL exactly 0.5 scores 0.5.
* "megatron": NVLM's `examples/multimodal/evaluation/evaluate_vqav2.py::anls_score` (after the `anls`
  package by shunk031): prediction and answers are VQA-normalized first, NL is divided by the longer
  cleaned length, and a ground truth counts only when NL is *strictly* below the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvlm_jax.evaluation.metrics.vqa import MEGATRON, OFFICIAL, normalize_vqa_answer


def levenshtein_distance(a: str, b: str) -> int:
  """Edit distance with unit insert/delete/substitute costs (two-row dynamic programme)."""
  if len(a) < len(b):
    a, b = b, a
  previous = list(range(len(b) + 1))
  for i, char_a in enumerate(a, start=1):
    current = [i]
    for j, char_b in enumerate(b, start=1):
      substitute = previous[j - 1] + (char_a != char_b)
      current.append(min(substitute, previous[j] + 1, current[j - 1] + 1))
    previous = current
  return previous[-1]


def _anls_clean(text: str) -> str:
  return " ".join(text.strip().lower().split())


def _nl(cleaned_a: str, cleaned_b: str, raw_a: str, raw_b: str) -> float:
  # Both scripts divide by the longer *upper-cased* length; they differ in which strings they measure.
  length = max(len(raw_a.upper()), len(raw_b.upper()))
  return 0.0 if length == 0 else levenshtein_distance(cleaned_a, cleaned_b) / length


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5, scorer: str = OFFICIAL) -> float:
  """ANLS of one prediction against its ground truths (see the module docstring for the two scorers)."""
  if not answers:
    raise ValueError("anls needs at least one ground-truth answer")
  if scorer == OFFICIAL:
    pred = _anls_clean(prediction)
    best = 1.0 - min(_nl(_anls_clean(a), pred, a, prediction) for a in answers)
    return 0.0 if best < threshold else best
  if scorer == MEGATRON:
    pred = _anls_clean(normalize_vqa_answer(prediction))
    scores = []
    for answer in answers:
      gold = _anls_clean(normalize_vqa_answer(answer))
      distance = _nl(pred, gold, pred, gold)
      scores.append(1.0 - distance if distance < threshold else 0.0)
    return max(scores)
  raise ValueError(f"unknown ANLS scorer {scorer!r}; expected {OFFICIAL!r} or {MEGATRON!r}")
