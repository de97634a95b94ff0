"""User-turn texts for each benchmark, with `<image>` marks where the image embeddings go.

Wording follows NVLM's Megatron evaluation (`examples/multimodal/run_text_generation.py::get_conversation`,
`examples/multimodal/evaluation/evaluation_datasets.py`): the image mark, a newline, the question,
then the benchmark's answer instruction. MMMU prompts are the official MMMU `construct_prompt` with
the LLaVA-1.5 config, and the `<image k>` tags of the text rewritten for a single image as Megatron
does. The k-th `<image>` mark stands for ``sample["images"][k]``; images beyond the last mark are not
shown to the model (MMMU single-image style uses image 1 only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

IMAGE_MARK = "<image>"
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
SHORT_ANSWER_OR_NUMBER_INSTRUCTION = "Answer the question using a single word, phrase, or number."
STEP_BY_STEP_BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (
  "Complete the following Python function. Reply with the complete function "
  "(including the signature) in a single ```python code block."
)


def with_image_marks(text: str, num_images: int) -> str:
  """Prepend one "<image>\\n" per image unless the text already places its marks."""
  if num_images == 0 or IMAGE_MARK in text:
    return text
  return f"{IMAGE_MARK}\n" * num_images + text


def lettered_options(options: Sequence[str], style: str = "dot") -> str:
  """ "A. cat\\nB. dog\\n" (style "dot", Megatron/VLMEvalKit) or "(A) cat\\n(B) dog\\n" ("paren", MMMU)."""
  template = "{letter}. {text}\n" if style == "dot" else "({letter}) {text}\n"
  return "".join(template.format(letter=chr(ord("A") + i), text=t) for i, t in enumerate(options))


# Every builder takes (sample, instruction) -> user text; `instruction` is the benchmark's answer suffix.


def question_with_instruction(sample: Mapping[str, Any], instruction: str) -> str:
  """Question then instruction (VQAv2, TextVQA, DocVQA, InfoVQA, ChartQA; OCRBench has none)."""
  text = f"{sample['question']}\n{instruction}" if instruction else sample["question"]
  return with_image_marks(text, len(sample["images"]))


def letter_choice_question(sample: Mapping[str, Any], instruction: str) -> str:
  """Question, "A. ..." option lines, then the instruction (AI2D, RealWorldQA, MathVista MC).
  Without options (RealWorldQA's few open questions) the short-answer instruction is used."""
  if not sample.get("options"):
    return question_with_instruction(sample, SHORT_ANSWER_INSTRUCTION)
  text = f"{sample['question']}\n{lettered_options(sample['options'])}{instruction}"
  return with_image_marks(text, len(sample["images"]))


# ----------------------------------------------------------------------------- MMMU

_FIRST = "<image 1>"


def _drop_first_tag_and_join(q: str) -> str:
  return " ".join(part.strip() for part in q.split(_FIRST) if part.strip())


# Megatron's single-image rewrite of "<image 1>" (MMMUDataset.process_image_tag): the first rule
# whose test holds is applied; "<image 2>".."<image 7>" are then deleted.
_FIRST_TAG_RULES: tuple[tuple[Callable[[str], bool], Callable[[str], str]], ...] = (
  (lambda q: q == _FIRST, lambda q: "Answer the question in the image."),
  (lambda q: ":" + _FIRST in q, lambda q: q.replace(":" + _FIRST, " in the image. ").strip()),
  (lambda q: ": " + _FIRST in q, lambda q: q.replace(": " + _FIRST, " in the image. ").strip()),
  (lambda q: "." + _FIRST in q or ". " + _FIRST in q, _drop_first_tag_and_join),
  (
    lambda q: q.startswith(_FIRST + " "),
    lambda q: q.replace(_FIRST, "" if q[len(_FIRST) + 1].isupper() else "The image").strip(),
  ),
  (lambda q: q.startswith(_FIRST), lambda q: q.replace(_FIRST, "")),
  (lambda q: q.endswith(_FIRST + "?"), lambda q: q.replace(_FIRST, "the image")),
  (
    lambda q: q.endswith("?" + _FIRST) or q.endswith("? " + _FIRST) or q.endswith("\n" + _FIRST),
    lambda q: q.replace(_FIRST, "").strip(),
  ),
  (lambda q: " " + _FIRST in q, lambda q: q.replace(_FIRST, "the image")),
  (lambda q: "()" + _FIRST in q, lambda q: q.replace("()" + _FIRST, "")),
  (lambda q: "(" + _FIRST + ")" in q, lambda q: q.replace("(" + _FIRST + ")", "")),
  (lambda q: _FIRST + "." in q, lambda q: q.replace(_FIRST + ".", ". ")),
)


def rewrite_mmmu_image_tags(text: str) -> str:
  """Turn MMMU's inline "<image k>" tags into plain words for a single-image prompt."""
  q = text.strip()
  for applies, rewrite in _FIRST_TAG_RULES:
    if applies(q):
      q = rewrite(q)
      break
  else:
    q = q.replace(_FIRST, ". ").strip()
  for k in range(2, 8):
    q = q.replace(f"<image {k}>", "")
  return q


def mmmu_question(sample: Mapping[str, Any], instruction: str) -> str:
  """Official MMMU construct_prompt (LLaVA-1.5 config), single-image rewrite, one image mark.
  `instruction` ends multiple-choice prompts; open questions end with the short-answer one."""
  question = sample["question"].strip()
  if sample.get("question_type") == "multiple-choice":
    text = f"{question}\n{lettered_options(sample['options'], style='paren')}\n{instruction}"
  else:
    text = f"{question}\n{SHORT_ANSWER_INSTRUCTION}"
  text = rewrite_mmmu_image_tags(text)
  return f"{IMAGE_MARK}\n{text}" if sample["images"] else text


def mathvista_question(sample: Mapping[str, Any], instruction: str) -> str:
  """Multiple choice: question + "A. ..." lines + instruction; free form: the dataset's `query`
  (which carries its own hint) with "Hint: " removed, or the question when no query is stored."""
  if sample.get("question_type") == "multi_choice":
    return letter_choice_question(sample, instruction)
  text = sample.get("query", sample["question"]).replace("Hint: ", "")
  return with_image_marks(text, len(sample["images"]))


# ----------------------------------------------------------------------------- text benchmarks


def mmlu_question(sample: Mapping[str, Any], instruction: str) -> str:
  """Zero-shot MMLU: a subject header (from "category"), the question, "A. ..." lines, instruction."""
  subject = sample.get("category")
  header = (
    f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n\n"
    if isinstance(subject, str)
    else ""
  )
  return f"{header}{sample['question']}\n{lettered_options(sample['options'])}{instruction}"


def code_completion_question(sample: Mapping[str, Any], instruction: str) -> str:
  """HumanEval: the instruction, then the problem prompt in a python code block."""
  return f"{instruction}\n\n```python\n{sample['question'].rstrip()}\n```"
