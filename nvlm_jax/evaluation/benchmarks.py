"""The benchmark registry: prompt, generation length and metric of every benchmark NVLM reports.

`BENCHMARKS[name]` is a `Benchmark`. `build_prompt(sample)` gives ``(system_prompt, user_text)``;
`images_for_prompt` says which images its `<image>` marks stand for; `score` turns predictions into
per-sample scores, by default with each benchmark's official scorer (option ``scorer="megatron"``: NVLM's
own rules). System prompts follow docs/paper.md (e) / Megatron `run_text_generation.py`; the four text
benchmarks' protocols are not published (docs/paper.md, open point 6) and are this project's choice (zero-shot,
documented in docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nvlm_jax.evaluation import prompts
from nvlm_jax.evaluation.metrics import (
  anls,
  chartqa,
  humaneval,
  mathvista,
  mmmu,
  multiple_choice,
  ocrbench,
  text_benchmarks,
  vqa,
)
from nvlm_jax.evaluation.sandbox import ExecutionLimits

FOLLOW_INSTRUCTIONS = "Follow the user's instruction and answer questions."
ANSWER_QUESTIONS = "Answer the questions."
MATH_EXPERT = "You are math expert. Use your math knowledge to calculate the answer."

Row = Mapping[str, Any]  # a sample merged with its prediction ("prediction" key)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """How to prompt for and score one benchmark.

  score_sample(prediction, row, **options) -> score in [0, 1] for one sample; score_rows, when set,
  replaces it for benchmarks that score a whole batch at once (HumanEval executes code) and returns
  (scores, extra summary fields). aggregate "mean" reports 100 x the mean score, "sum" the total
  (OCRBench: points out of 1000).
  """

  name: str
  metric: str  # human-readable metric name
  source: str  # official script the metric follows
  system_prompt: str
  answer_suffix: str
  max_new_tokens: int
  prompt_builder: Callable[[Row, str], str]
  score_sample: Callable[..., float] | None = None
  score_rows: Callable[..., tuple[list[float], dict[str, Any]]] | None = None
  aggregate: str = "mean"
  required_fields: tuple[str, ...] = ()
  category_of: Callable[[Row], str | list[str] | None] = lambda row: row.get("category")
  # Extra summary fields computed from the per-sample scores grouped by category.
  summarize_categories: Callable[[Mapping[str, Sequence[float]]], dict[str, Any]] | None = None

  def build_prompt(self, sample: Row) -> tuple[str, str]:
    """(system prompt, user text with `<image>` marks) for one sample."""
    return self.system_prompt, self.prompt_builder(sample, self.answer_suffix)

  def option_names(self) -> list[str]:
    scorer = self.score_rows or self.score_sample
    return [p.name for p in inspect.signature(scorer).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]

  def score(self, rows: Sequence[Row], **options: Any) -> tuple[list[float], dict[str, Any]]:
    """Per-row scores in [0, 1] plus extra summary fields; `options` are the metric's keyword options."""
    unknown = sorted(set(options) - set(self.option_names()))
    if unknown:
      raise ValueError(f"{self.name}: unknown metric option(s) {unknown}; accepted: {self.option_names()}")
    if self.score_rows is not None:
      return self.score_rows(rows, **options)
    scores = []
    for row in rows:
      if not isinstance(row["prediction"], str):
        raise ValueError(
          f"{self.name}: sample {row['id']!r} has {len(row['prediction'])} "
          "predictions; this benchmark takes exactly one string per sample"
        )
      try:
        scores.append(float(self.score_sample(row["prediction"], row, **options)))
      except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{self.name}: cannot score sample {row['id']!r}: {e!r}") from e
    return scores, {}


def images_for_prompt(sample: Row, user_text: str) -> list[str]:
  """The images the prompt's `<image>` marks refer to, in order."""
  count = user_text.count(prompts.IMAGE_MARK)
  if count > len(sample["images"]):
    raise ValueError(
      f"sample {sample['id']!r}: prompt has {count} image marks but only {len(sample['images'])} image(s)"
    )
  return list(sample["images"][:count])


# ----------------------------------------------------------------------------- per-benchmark scoring


def _first_answer(row: Row) -> str:
  return row["answers"][0]


def _vqa(prediction: str, row: Row, *, scorer: str = vqa.OFFICIAL) -> float:
  return vqa.vqa_accuracy(prediction, row["answers"], scorer=scorer)


def _anls(prediction: str, row: Row, *, scorer: str = vqa.OFFICIAL, threshold: float = 0.5) -> float:
  return anls.anls(prediction, row["answers"], threshold=threshold, scorer=scorer)


def _chartqa(prediction: str, row: Row, *, scorer: str = vqa.OFFICIAL, tolerance: float = 0.05) -> float:
  return chartqa.relaxed_accuracy(prediction, row["answers"], tolerance=tolerance, scorer=scorer)


def _option(prediction: str, row: Row, *, scorer: str = "letter") -> float:
  """Default "letter": our option-letter reader; "megatron": Megatron's exact match after VQA normalization."""
  if scorer == vqa.MEGATRON or (scorer == "letter" and not row.get("options")):
    # Megatron scores every question so; open questions (RealWorldQA has a few) always are.
    return float(vqa.normalize_vqa_answer(prediction) == vqa.normalize_vqa_answer(_first_answer(row)))
  if scorer == "letter":
    return multiple_choice.option_accuracy(prediction, _first_answer(row), row["options"])
  raise ValueError(f"unknown scorer {scorer!r}; expected 'letter' or 'megatron'")


def _ocrbench(prediction: str, row: Row, *, scorer: str = vqa.OFFICIAL) -> float:
  return ocrbench.ocrbench_hit(prediction, row["answers"], row.get("dataset_name", ""), scorer=scorer)


def _mmmu(prediction: str, row: Row, *, scorer: str = vqa.OFFICIAL) -> float:
  return float(
    mmmu.mmmu_correct(
      prediction, row["answers"], row["question_type"], row.get("options", ()), seed=row["id"], scorer=scorer
    )
  )


def _mathvista(rows: Sequence[Row], *, scorer: str = vqa.OFFICIAL) -> tuple[list[float], dict[str, Any]]:
  """Per-sample correctness plus how many answers needed the rule-based stand-in for the LLM extractor."""
  scores, fallbacks = [], 0
  for row in rows:
    if not isinstance(row["prediction"], str):
      raise ValueError(f"mathvista: sample {row['id']!r} must have exactly one string prediction")  # noqa: TRY004
    try:
      judgement = mathvista.mathvista_judgement(row["prediction"], row, scorer=scorer)
    except (ValueError, KeyError, IndexError) as e:
      raise ValueError(f"mathvista: cannot score sample {row['id']!r}: {e!r}") from e
    scores.append(float(judgement.correct))
    fallbacks += judgement.used_fallback
  return scores, {"scorer": scorer, "num_rule_based_extractions": fallbacks}


def _mmlu(prediction: str, row: Row) -> float:
  return float(text_benchmarks.mmlu_correct(prediction, _first_answer(row), row["options"]))


def _gsm8k(prediction: str, row: Row) -> float:
  return float(text_benchmarks.gsm8k_correct(prediction, _first_answer(row)))


def _math(prediction: str, row: Row, *, extended: bool = False) -> float:
  return float(text_benchmarks.math_correct(prediction, _first_answer(row), extended=extended))


def _humaneval(
  rows: Sequence[Row],
  *,
  timeout_s: float = 3.0,
  memory_mb: int = 1024,
  max_parallel: int | None = None,
  ks: Sequence[int] = (1, 10, 100),
) -> tuple[list[float], dict[str, Any]]:
  """Per problem: the fraction of its completions that pass (= unbiased pass@1)."""
  completions = [[r["prediction"]] if isinstance(r["prediction"], str) else list(r["prediction"]) for r in rows]
  limits = ExecutionLimits(timeout_s=timeout_s, memory_bytes=memory_mb << 20)
  results = humaneval.check_completions(rows, completions, limits, max_parallel)
  correct = [sum(r.passed for r in per_problem) for per_problem in results]
  totals = [len(c) for c in completions]
  pass_at_k = {}
  for k in ks:
    if rows and k <= min(totals):
      estimates = [humaneval.estimate_pass_at_k(n, c, k) for n, c in zip(totals, correct)]
      pass_at_k[f"pass@{k}"] = 100.0 * sum(estimates) / len(estimates)
  statuses: dict[str, int] = {}
  for per_problem in results:
    for result in per_problem:
      statuses[result.status] = statuses.get(result.status, 0) + 1
  return [c / n for c, n in zip(correct, totals)], {"pass_at_k": pass_at_k, "execution_status": statuses}


def _mmmu_domains(scores_by_subject: Mapping[str, Sequence[float]]) -> dict[str, Any]:
  """Official MMMU report: accuracy over all questions of each domain's subjects."""
  per_domain = {}
  for domain, subjects in mmmu.DOMAIN_SUBJECTS.items():
    scores = [s for subject in subjects for s in scores_by_subject.get(subject, ())]
    if scores:
      per_domain[domain] = {"score": 100.0 * sum(scores) / len(scores), "num_samples": len(scores)}
  return {"per_domain": per_domain}


def _ocrbench_components(scores_by_type: Mapping[str, Sequence[float]]) -> dict[str, Any]:
  return {
    "components": ocrbench.component_scores({t: sum(v) for t, v in scores_by_type.items()}),
    "component_totals": dict(ocrbench.COMPONENT_TOTALS),
  }


def _mmmu_category(row: Row) -> str:
  return row.get("category") or mmmu.subject_from_id(row["id"])


# ----------------------------------------------------------------------------- registry

_MEGATRON_OPTION = "; scorer=megatron: NVIDIA/Megatron-LM examples/multimodal/evaluation/{}"
_ANLS_SOURCE = (
  "{} RRC server ANLS (copy: OpenGVLab/InternVL eval/vqa/infographicsvqa_eval.py)"
  + _MEGATRON_OPTION.format("evaluate_vqav2.py::anls_score")
)
_VQA_SOURCE = "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py" + _MEGATRON_OPTION.format(
  "evaluate_vqav2.py"
)


def _registry() -> dict[str, Benchmark]:
  short, short_or_number = prompts.SHORT_ANSWER_INSTRUCTION, prompts.SHORT_ANSWER_OR_NUMBER_INSTRUCTION
  letter = prompts.LETTER_INSTRUCTION
  benchmarks = [
    Benchmark(
      "vqav2",
      "VQA accuracy (mean over 10 leave-one-out subsets of min(1, #matches/3))",
      _VQA_SOURCE,
      FOLLOW_INSTRUCTIONS,
      short,
      32,
      prompts.question_with_instruction,
      score_sample=_vqa,
      required_fields=("answers",),
    ),
    Benchmark(
      "textvqa",
      "VQA accuracy (mean over 10 leave-one-out subsets of min(1, #matches/3))",
      _VQA_SOURCE,
      FOLLOW_INSTRUCTIONS,
      short_or_number,
      32,
      prompts.question_with_instruction,
      score_sample=_vqa,
      required_fields=("answers",),
    ),
    Benchmark(
      "docvqa",
      "ANLS (threshold 0.5)",
      _ANLS_SOURCE.format("DocVQA"),
      FOLLOW_INSTRUCTIONS,
      short_or_number,
      32,
      prompts.question_with_instruction,
      score_sample=_anls,
      required_fields=("answers",),
    ),
    Benchmark(
      "infovqa",
      "ANLS (threshold 0.5)",
      _ANLS_SOURCE.format("InfographicVQA"),
      FOLLOW_INSTRUCTIONS,
      short_or_number,
      32,
      prompts.question_with_instruction,
      score_sample=_anls,
      required_fields=("answers",),
    ),
    Benchmark(
      "chartqa",
      "relaxed accuracy (5%)",
      "google-research/pix2struct pix2struct/metrics.py::relaxed_correctness"
      + _MEGATRON_OPTION.format("evaluate_vqav2.py (task ChartQA)"),
      FOLLOW_INSTRUCTIONS,
      short,
      32,
      prompts.question_with_instruction,
      score_sample=_chartqa,
      required_fields=("answers",),
    ),
    Benchmark(
      "ai2d",
      "option accuracy",
      "option-letter reading in the spirit of VLMEvalKit vlmeval/utils/matching_util.py::can_infer"
      + _MEGATRON_OPTION.format("evaluate_vqav2.py (task AI2D, exact match)"),
      FOLLOW_INSTRUCTIONS,
      letter,
      32,
      prompts.letter_choice_question,
      score_sample=_option,
      required_fields=("answers", "options"),
    ),
    Benchmark(
      "realworldqa",
      "option accuracy",
      "option-letter reading in the spirit of VLMEvalKit vlmeval/utils/matching_util.py::can_infer"
      + _MEGATRON_OPTION.format("evaluate_realworldqa.py (exact match)"),
      FOLLOW_INSTRUCTIONS,
      letter,
      32,
      prompts.letter_choice_question,
      score_sample=_option,
      required_fields=("answers",),
    ),
    Benchmark(
      "ocrbench",
      "OCRBench points (substring match), out of 1000",
      "Yuliang-Liu/MultimodalOCR OCRBench/example.py" + _MEGATRON_OPTION.format("evaluate_ocrbench.py"),
      FOLLOW_INSTRUCTIONS,
      "",
      128,
      prompts.question_with_instruction,
      score_sample=_ocrbench,
      aggregate="sum",
      required_fields=("answers", "dataset_name"),
      summarize_categories=_ocrbench_components,
    ),
    Benchmark(
      "mmmu",
      "MMMU accuracy",
      "MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py + mmmu/main_eval_only.py"
      + _MEGATRON_OPTION.format("evaluate_mmmu.py"),
      ANSWER_QUESTIONS,
      letter,
      512,
      prompts.mmmu_question,
      score_sample=_mmmu,
      required_fields=("answers", "question_type"),
      category_of=_mmmu_category,
      summarize_categories=_mmmu_domains,
    ),
    Benchmark(
      "mathvista",
      "MathVista accuracy",
      "lupantech/MathVista evaluation/extract_answer.py + calculate_score.py (rule-based stand-in for the "
      "LLM extractor)" + _MEGATRON_OPTION.format("evaluate_mathvista.py"),
      MATH_EXPERT,
      letter,
      512,
      prompts.mathvista_question,
      score_rows=_mathvista,
      required_fields=("answers", "question_type"),
    ),
    Benchmark(
      "mmlu",
      "accuracy",
      "hendrycks/test (letter accuracy; zero-shot prompt is this project's)",
      FOLLOW_INSTRUCTIONS,
      letter,
      32,
      prompts.mmlu_question,
      score_sample=_mmlu,
      required_fields=("answers", "options"),
    ),
    Benchmark(
      "gsm8k",
      "accuracy (final number)",
      "openai/grade-school-math grade_school_math/dataset.py",
      FOLLOW_INSTRUCTIONS,
      prompts.STEP_BY_STEP_BOXED_INSTRUCTION,
      1024,
      prompts.question_with_instruction,
      score_sample=_gsm8k,
      required_fields=("answers",),
    ),
    Benchmark(
      "math",
      "accuracy (last \\boxed{}, Hendrycks equivalence)",
      "hendrycks/math modeling/math_equivalence.py + modeling/dataset/util.py",
      FOLLOW_INSTRUCTIONS,
      prompts.STEP_BY_STEP_BOXED_INSTRUCTION,
      2048,
      prompts.question_with_instruction,
      score_sample=_math,
      required_fields=("answers",),
    ),
    Benchmark(
      "humaneval",
      "pass@1 (sandboxed execution)",
      "openai/human-eval human_eval/execution.py + human_eval/evaluation.py",
      FOLLOW_INSTRUCTIONS,
      prompts.CODE_INSTRUCTION,
      1024,
      prompts.code_completion_question,
      score_rows=_humaneval,
      required_fields=("question", "test", "entry_point"),
    ),
  ]
  return {b.name: b for b in benchmarks}


BENCHMARKS: dict[str, Benchmark] = _registry()


def benchmark_help() -> str:
  """The benchmark names and their metric options, for command-line --help."""
  lines = ["benchmarks (--benchmark NAME) and their metric options (--option KEY=VALUE):"]
  for benchmark in BENCHMARKS.values():
    options = ", ".join(benchmark.option_names()) or "-"
    lines.append(f"  {benchmark.name:<12} {benchmark.metric}; options: {options}")
  lines.append("scorer=megatron selects NVLM's own Megatron-LM rules where a benchmark has them (docs/evaluation.md).")
  return "\n".join(lines)


def get_benchmark(name: str | Benchmark) -> Benchmark:
  """Look a benchmark up by name (case and "-"/"_" insensitive)."""
  if isinstance(name, Benchmark):
    return name
  key = name.lower().replace("-", "").replace("_", "")
  for benchmark_name, benchmark in BENCHMARKS.items():
    if benchmark_name.replace("_", "") == key:
      return benchmark
  raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
