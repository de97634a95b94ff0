"""MathVista (testmini) scoring as NVLM's Megatron scorer does it
(`examples/multimodal/evaluation/evaluate_mathvista.py`).

* multi_choice: the response is parsed with MMMU's `parse_multi_choice_response` and compared with
  the gold letter;
* free_form: response and gold answer are VQA-normalized, decimals are cut (not rounded) to at most
  2 places ("3.00" -> "3", "3.14159" -> "3.14"), "%" and one trailing "." removed; from a response that
  still contains words, the number after "answer is" is extracted. Then exact string equality.

MathVista's own scorer (lupantech/MathVista) uses a GPT answer extractor; the paper's numbers come from
the rule-based pipeline above.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nvlm_jax.evaluation.metrics.multiple_choice import option_letters, parse_multi_choice_response
from nvlm_jax.evaluation.metrics.vqa import normalize_vqa_answer

MULTI_CHOICE = "multi_choice"
FREE_FORM = "free_form"

_DECIMAL = re.compile(r"^\d+\.\d+$")
_HAS_LETTERS = re.compile(r"[a-zA-Z]+")
_ANSWER_IS_NUMBER = re.compile(r"answer is -*\d+\.*\d*")
_NUMBER = re.compile(r"-*\d+\.*\d*")


def cap_decimals(text: str) -> str:
  """Reference `extra_processing`: truncate a bare decimal to 2 places (drop all-zero decimals),
  remove "%", then one trailing period."""
  if _DECIMAL.match(text):
    whole, fraction = text.split(".")
    text = whole if set(fraction) == {"0"} else f"{whole}.{fraction[:2]}"
  text = text.replace("%", "")
  if text.endswith("."):
    text = text[:-1]
  return text


def extract_stated_number(text: str) -> str:
  """Reference `extract_answer`: in wordy text (and not scientific "e+" notation), the first
  "answer is N" gives N; anything else is returned unchanged."""
  if _HAS_LETTERS.search(text) and "e+" not in text:
    stated = _ANSWER_IS_NUMBER.search(text)
    if stated:
      number = _NUMBER.search(stated.group(0))
      return number.group(0) if number else stated.group(0)
  return text


def normalize_free_form_prediction(text: str) -> str:
  return extract_stated_number(cap_decimals(normalize_vqa_answer(text)))


def normalize_free_form_answer(text: str) -> str:
  return cap_decimals(normalize_vqa_answer(text))


def mathvista_correct(
  prediction: str, answer: str, question_type: str, options: Sequence[str] = (), seed: str | None = None
) -> bool:
  if question_type == MULTI_CHOICE:
    letters = option_letters(len(options))
    letter = parse_multi_choice_response(prediction, letters, dict(zip(letters, options)), seed=seed)
    return letter == answer
  if question_type == FREE_FORM:
    return normalize_free_form_prediction(prediction) == normalize_free_form_answer(answer)
  raise ValueError(f"unknown MathVista question_type {question_type!r}; expected {MULTI_CHOICE!r} or {FREE_FORM!r}")
