"""OCRBench (v1) scoring: 1000 questions, one point per question whose answer appears in the output.

Follows the benchmark authors' script (Yuliang-Liu/MultimodalOCR `OCRBench/example.py`), which NVLM's
Megatron scorer reproduces (`examples/multimodal/evaluation/evaluate_ocrbench.py`):

* every source except HME100k: lower-case, strip, newlines -> spaces, hit if any ground truth is a
  substring of the prediction;
* HME100k (handwritten math): strip, newlines -> spaces, then all spaces removed, case-sensitive.

A question scores at most one point, as in the authors' script (scorer "official", the default).
Megatron's copy adds one point per matching ground truth (scorer "megatron"); that only matters for
questions with several matching answers, and can push a total above 1000.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nvlm_jax.evaluation.metrics.vqa import MEGATRON, OFFICIAL

HME_SOURCE = "HME100k"

# The five reported components and the ten question types ("type" field) they sum, with totals.
COMPONENTS: dict[str, tuple[str, ...]] = {
  "Text Recognition": (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
  ),
  "Scene Text-centric VQA": ("Scene Text-centric VQA",),
  "Doc-oriented VQA": ("Doc-oriented VQA",),
  "Key Information Extraction": ("Key Information Extraction",),
  "Handwritten Mathematical Expression Recognition": ("Handwritten Mathematical Expression Recognition",),
}
COMPONENT_TOTALS = {
  "Text Recognition": 300,
  "Scene Text-centric VQA": 200,
  "Doc-oriented VQA": 200,
  "Key Information Extraction": 200,
  "Handwritten Mathematical Expression Recognition": 100,
}
QUESTION_TYPES = tuple(t for types in COMPONENTS.values() for t in types)


def _normalize(text: str, source: str) -> str:
  if source == HME_SOURCE:
    return text.strip().replace("\n", " ").replace(" ", "")
  return text.lower().strip().replace("\n", " ")


def ocrbench_hit(prediction: str, answers: Sequence[str], source: str, scorer: str = OFFICIAL) -> int:
  """Points for one question: 1 if any ground truth is contained in the prediction under the source's
  normalization ("official"), or the number of contained ground truths ("megatron")."""
  if not answers:
    raise ValueError("ocrbench_hit needs at least one ground-truth answer")
  pred = _normalize(prediction, source)
  hits = sum(_normalize(answer, source) in pred for answer in answers)
  if scorer == OFFICIAL:
    return int(hits > 0)
  if scorer == MEGATRON:
    return hits
  raise ValueError(f"unknown OCRBench scorer {scorer!r}; expected {OFFICIAL!r} or {MEGATRON!r}")


def component_scores(points_per_type: Mapping[str, float]) -> dict[str, float]:
  """Sum per-type points into the five components the paper reports (out of 300/200/200/200/100)."""
  unknown = sorted(set(points_per_type) - set(QUESTION_TYPES))
  if unknown:
    raise ValueError(f"unknown OCRBench question type(s) {unknown}; expected one of {list(QUESTION_TYPES)}")
  return {name: sum(points_per_type.get(t, 0) for t in types) for name, types in COMPONENTS.items()}
