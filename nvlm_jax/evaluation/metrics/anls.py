"""ANLS (Average Normalized Levenshtein Similarity) for DocVQA and InfographicVQA.

Follows the metric of the DocVQA/InfoVQA challenges (RRC, Biten et al. 2019) as NVLM's Megatron
scripts compute it (`examples/multimodal/evaluation/evaluate_vqav2.py::anls_score`, itself after the
`anls` package by shunk031): per ground truth, ``1 - NL`` if the normalized Levenshtein distance NL
is below the threshold (0.5) else 0; the sample scores the best ground truth. Strings are compared
lower-cased with surrounding whitespace stripped and inner whitespace collapsed to single spaces.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvlm_jax.evaluation.metrics.vqa import normalize_vqa_answer


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


def normalized_levenshtein_distance(a: str, b: str) -> float:
  # The reference divides by the longer *upper-cased* length (differs only for e.g. "ß" -> "SS").
  length = max(len(a.upper()), len(b.upper()))
  return 0.0 if length == 0 else levenshtein_distance(a, b) / length


def _anls_clean(text: str) -> str:
  return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5, vqa_normalize: bool = False) -> float:
  """Best ``1 - NL`` over ground truths, 0 where NL >= threshold.

  vqa_normalize=True first applies the VQA punctuation/digit/article normalization to prediction
  and answers, as Megatron's local scorer does (it routes DocVQA/InfoVQA through the VQA
  pipeline); the challenge servers, which produced NVLM's test-set numbers, do not.
  """
  if not answers:
    raise ValueError("anls needs at least one ground-truth answer")
  if vqa_normalize:
    prediction = normalize_vqa_answer(prediction)
    answers = [normalize_vqa_answer(a) for a in answers]
  pred = _anls_clean(prediction)
  best = 0.0
  for answer in answers:
    distance = normalized_levenshtein_distance(pred, _anls_clean(answer))
    best = max(best, 1.0 - distance if distance < threshold else 0.0)
  return best
