"""MathVista (testmini) scoring: the official pipeline by default, NVLM's Megatron rules as an option.

scorer="official" follows lupantech/MathVista `evaluation/extract_answer.py` and `calculate_score.py`:

* extraction: an empty response gives ""; a multiple-choice response that *is* one choice's text is
  taken as is; for answer_type "integer"/"float" a response that Python's `int()`/`float()` reads whole
  is taken (``str(int(r))`` / ``str(float(r))``). Anything else goes to a GPT extractor in the official
  pipeline. No LLM is called here: the documented rule-based fallback `fallback_extraction` stands in,
  and `MathVistaJudgement.used_fallback` marks the answers that needed it (the summary counts them);
* normalization: multiple choice: "(X)" -> letter X, a letter names its choice, any other text becomes
  the choice with the smallest Levenshtein distance (the first on a tie); integer: ``str(int(float(x)))``
  (truncates, as the reference); float: ``str(round(float(x), precision))`` (rounds); list: ``str(x)``;
  an unreadable number is wrong. Correct iff the normalized extraction equals the gold answer string.

scorer="megatron" is NVIDIA/Megatron-LM `examples/multimodal/evaluation/evaluate_mathvista.py`, which
produced NVLM's reported number:

* multi_choice: the response is parsed with MMMU's `parse_multi_choice_response` and compared with
  the gold letter;
* free_form: response and gold answer are VQA-normalized (which drops "-" signs), decimals are cut (not
  rounded) to at most 2 places ("3.00" -> "3", "3.14159" -> "3.14"), "%" and one trailing "." removed;
  from a response that still contains words, the number after "answer is" is extracted. Then exact
  string equality.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from nvlm_jax.evaluation.metrics.anls import levenshtein_distance
from nvlm_jax.evaluation.metrics.multiple_choice import option_letters, parse_multi_choice_response, parse_option_letter
from nvlm_jax.evaluation.metrics.vqa import MEGATRON, OFFICIAL, normalize_vqa_answer

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


def megatron_correct(
  prediction: str, answer: str, question_type: str, options: Sequence[str] = (), seed: str | None = None
) -> bool:
  if question_type == MULTI_CHOICE:
    letters = option_letters(len(options))
    letter = parse_multi_choice_response(prediction, letters, dict(zip(letters, options)), seed=seed)
    return letter == answer
  if question_type == FREE_FORM:
    return normalize_free_form_prediction(prediction) == normalize_free_form_answer(answer)
  raise ValueError(f"unknown MathVista question_type {question_type!r}; expected {MULTI_CHOICE!r} or {FREE_FORM!r}")


# ----------------------------------------------------------------------------- official pipeline

_QUOTED_ANSWER = re.compile(r'The answer is "(.*)"\.')  # the official "quick extraction" rule
_STATED_NUMBER = re.compile(
  r"answer(?:\s+is)?\s*[:：]?\s*\$?\s*([-\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))", re.IGNORECASE
)
_ANY_NUMBER = re.compile(r"[-\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_BRACKETED_LIST = re.compile(r"\[[^\[\]]*\]")


@dataclasses.dataclass(frozen=True)
class MathVistaJudgement:
  correct: bool
  extraction: str
  used_fallback: bool  # the official pipeline would have asked its LLM extractor


def _plain_number(text: str) -> str:
  return text.replace("\u2212", "-").replace(",", "")


def fallback_extraction(response: str, question_type: str, answer_type: str, options: Sequence[str]) -> str:
  """Rule-based stand-in for the official GPT extractor (ours; documented in docs/evaluation.md).

  In order: the official quick rule 'The answer is "X".'; multiple choice: the letter the response names
  (`parse_option_letter`), else the one choice whose text it contains, else the response (normalization
  then picks the most similar choice); integer/float: the number after the last "answer (is)", else the
  last number (Unicode minus and thousands commas handled); list: the last "[...]"; else "".
  """
  quoted = _QUOTED_ANSWER.search(response)
  if quoted:
    return quoted.group(1)
  if question_type == MULTI_CHOICE:
    letter = parse_option_letter(response, options)
    if letter is not None:
      return letter
    contained = [c for c in options if c and c.lower() in response.lower()]
    return contained[0] if len(contained) == 1 else response
  if answer_type in ("integer", "float"):
    stated = _STATED_NUMBER.findall(response)
    numbers = stated or _ANY_NUMBER.findall(response)
    return _plain_number(numbers[-1]) if numbers else ""
  if answer_type == "list":
    lists = _BRACKETED_LIST.findall(response)
    return lists[-1] if lists else ""
  return ""


def official_extraction(
  response: str, question_type: str, answer_type: str, options: Sequence[str]
) -> tuple[str, bool]:
  """(extraction, used_fallback) as `extract_answer.py`, with the LLM step replaced by the fallback."""
  if response == "":
    return "", False
  if question_type == MULTI_CHOICE and response in options:
    return response, False
  try:
    if answer_type == "integer":
      return str(int(response)), False
  except ValueError:
    pass
  try:
    if answer_type == "float":
      return str(float(response)), False
  except ValueError:
    pass
  return fallback_extraction(response, question_type, answer_type, options), True


def _most_similar(text: str, choices: Sequence[str]) -> str:
  distances = [levenshtein_distance(text, choice) for choice in choices]
  return choices[distances.index(min(distances))]


def normalize_extraction(
  extraction: str, question_type: str, answer_type: str, options: Sequence[str], precision: Any
) -> str | None:
  """`calculate_score.py::normalize_extracted_answer`: the extraction in the gold answer's format, or None."""
  if question_type == MULTI_CHOICE:
    extraction = extraction.strip()
    bracketed = re.findall(r"\(([a-zA-Z])\)", extraction)
    if bracketed:
      extraction = bracketed[0].upper()
    letters = option_letters(len(options))
    if extraction in letters:
      return options[letters.index(extraction)]
    return _most_similar(extraction, options)
  try:
    if answer_type == "integer":
      return str(int(float(extraction)))
    if answer_type == "float":
      return str(round(float(extraction), int(precision)))
  except (ValueError, TypeError, OverflowError):
    return None
  if answer_type == "list":
    return str(extraction)
  return None


def official_judgement(prediction: str, row: Mapping[str, Any]) -> MathVistaJudgement:
  """Judge one prediction; `row` carries question_type, answer_type, precision, options and answers."""
  question_type = row["question_type"]
  options = list(row.get("options") or ())
  if question_type == MULTI_CHOICE:
    letters = option_letters(len(options))
    gold_letter = row["answers"][0]
    if gold_letter not in letters:
      raise ValueError(f"gold letter {gold_letter!r} is not one of {letters}")
    gold = row.get("answer_text", options[letters.index(gold_letter)])
    answer_type = row.get("answer_type", "text")
  elif question_type == FREE_FORM:
    gold = row["answers"][0]
    if "answer_type" not in row:
      raise ValueError("free_form question without 'answer_type' (integer, float, list or text)")
    answer_type = row["answer_type"]
    if answer_type == "float" and row.get("precision") is None:
      raise ValueError("float answer without 'precision'")
  else:
    raise ValueError(f"unknown MathVista question_type {question_type!r}; expected {MULTI_CHOICE!r} or {FREE_FORM!r}")
  extraction, used_fallback = official_extraction(prediction, question_type, answer_type, options)
  normalized = normalize_extraction(extraction, question_type, answer_type, options, row.get("precision"))
  return MathVistaJudgement(normalized == gold, extraction, used_fallback)


def mathvista_judgement(prediction: str, row: Mapping[str, Any], scorer: str = OFFICIAL) -> MathVistaJudgement:
  if scorer == OFFICIAL:
    return official_judgement(prediction, row)
  if scorer == MEGATRON:
    correct = megatron_correct(
      prediction, row["answers"][0], row["question_type"], row.get("options") or (), seed=row.get("id")
    )
    return MathVistaJudgement(correct, prediction, False)
  raise ValueError(f"unknown MathVista scorer {scorer!r}; expected {OFFICIAL!r} or {MEGATRON!r}")
