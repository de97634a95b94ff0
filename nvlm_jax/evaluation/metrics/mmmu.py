"""MMMU scoring: multiple-choice letter parsing and open-answer matching, per subject and domain.

Follows the official MMMU evaluation (MMMU-Benchmark/MMMU `mmmu/utils/eval_utils.py`,
`main_eval_only.py`): a multiple-choice response goes through `parse_multi_choice_response`; an open
response goes through `parse_open_response` and is correct when one of its candidate strings contains a
normalized ground truth, or one of its candidate numbers equals a ground-truth number (both rounded to
2 decimals). Scorer "megatron" is NVLM's driver (`examples/multimodal/evaluation/evaluate_mmmu.py`): it
first replaces a multiple-choice response by the content of its first ``\\answer{..}``/``\\boxed{..}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nvlm_jax.evaluation.metrics.multiple_choice import option_letters, parse_multi_choice_response
from nvlm_jax.evaluation.metrics.vqa import MEGATRON, OFFICIAL

DOMAIN_SUBJECTS: dict[str, tuple[str, ...]] = {
  "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
  "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
  "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
  "Health and Medicine": (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
  ),
  "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
  "Tech and Engineering": (
    "Agriculture",
    "Architecture_and_Engineering",
    "Computer_Science",
    "Electronics",
    "Energy_and_Power",
    "Materials",
    "Mechanical_Engineering",
  ),
}
SUBJECTS = tuple(s for subjects in DOMAIN_SUBJECTS.values() for s in subjects)
MULTIPLE_CHOICE = "multiple-choice"


def subject_from_id(sample_id: str) -> str:
  """MMMU ids look like "validation_Art_Theory_12": the subject is everything between split and number."""
  return "_".join(sample_id.split("_")[1:-1])


_ANSWER_COMMAND = re.compile(r"\\answer\{(.*?)\}")
_BOXED_COMMAND = re.compile(r"\\boxed\{(.*?)\}")


def extract_answer_command(text: str) -> str:
  """Content of the first \\answer{..}, else of the first \\boxed{..} (shortest match, as Megatron)."""
  for pattern in (_ANSWER_COMMAND, _BOXED_COMMAND):
    match = pattern.search(text)
    if match:
      return match.group(1)
  return text.replace("Answer:", "Answer: ")


# ----- open questions -----


def _is_number(text: str) -> bool:
  try:
    float(text.replace(",", ""))
    return True
  except ValueError:
    return False


def normalize_str(text: str) -> list[str | float]:
  """A number becomes [its value rounded to 2 decimals]; other text is lower-cased, and a single
  character is padded on one side or the other so it cannot match inside a word."""
  text = text.strip()
  if _is_number(text):
    return [round(float(text.replace(",", "")), 2)]
  text = text.lower()
  if len(text) == 1:
    return [" " + text, text + " "]
  return [text]


_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(text: str) -> list[str]:
  """Numbers written with thousands commas, in scientific notation, then plain, in that order."""
  return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_PLAIN.findall(text)


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = frozenset({":", ",", ".", "!", "?", ";", "'"})


def _key_subresponses(response: str) -> list[str]:
  """Per line, the shortest tail after an indicator word ("is ", "so ", ...; "=" on the last line)."""
  response = response.strip().strip(".").lower()
  # The official split is re.split(r'\.\s(?=[A-Z])|\n', ...) applied to lower-cased text, where
  # the upper-case look-ahead can never match: it splits on newlines only.
  lines = response.split("\n")
  keys = []
  for index, line in enumerate(lines):
    indicators = _KEY_INDICATORS + (("=",) if index == len(lines) - 1 else ())
    shortest = None
    for indicator in indicators:
      if indicator in line:
        tail = line.split(indicator)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in _TRIVIAL:
      keys.append(shortest)
  return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
  """Candidate answers of an open response: key phrases and the numbers in them, normalized."""
  keys = _key_subresponses(response)
  candidates = list(keys)
  for key in keys:
    candidates.extend(extract_numbers(key))
  normalized: list[str | float] = []
  for candidate in candidates:
    normalized.extend(normalize_str(candidate))
  return list(dict.fromkeys(normalized))  # de-duplicated; order is irrelevant to matching


def eval_open(answers: Sequence[str], candidates: Sequence[str | float]) -> bool:
  gold: list[str | float] = []
  for answer in answers:
    gold.extend(normalize_str(answer))
  gold_text = [g for g in gold if isinstance(g, str)]
  for candidate in candidates:
    if isinstance(candidate, str):
      if any(g in candidate for g in gold_text):
        return True
    elif candidate in gold:
      return True
  return False


def mmmu_correct(
  prediction: str,
  answers: Sequence[str],
  question_type: str,
  options: Sequence[str] = (),
  seed: str | None = None,
  scorer: str = OFFICIAL,
) -> bool:
  """MMMU judgement of one response; `seed` (the sample id) fixes the random fallback."""
  if scorer not in (OFFICIAL, MEGATRON):
    raise ValueError(f"unknown MMMU scorer {scorer!r}; expected {OFFICIAL!r} or {MEGATRON!r}")
  if question_type == MULTIPLE_CHOICE:
    letters = option_letters(len(options))
    response = extract_answer_command(prediction) if scorer == MEGATRON else prediction
    letter = parse_multi_choice_response(response, letters, dict(zip(letters, options)), seed=seed)
    return letter in answers
  return eval_open(answers, parse_open_response(prediction))
