"""Turning a free-text answer into an option letter.

Two parsers, for two families of benchmarks:

* `parse_multi_choice_response` — the MMMU benchmark's official parser
  (MMMU-Benchmark/MMMU `eval/eval_utils.py::parse_multi_choice_response`), which NVLM's Megatron
  scripts use for MMMU and MathVista multiple-choice questions. It always returns a letter: when
  nothing in the response points at an option, the official code draws one at random from a
  process-global RNG; here the draw is seeded by the sample id, so a score never depends on the
  order in which samples are scored.
* `parse_option_letter` — a stricter reader for benchmarks whose answer is one option letter
  (AI2D, RealWorldQA, MMLU). It accepts "A", "(A)", "A.", "A) text", "The answer is A",
  "**A**" or the exact text of one option, and returns None instead of guessing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

from nvlm_jax.evaluation.metrics.vqa import normalize_vqa_answer


def option_letters(num_options: int) -> list[str]:
  if not 0 < num_options <= 26:
    raise ValueError(f"expected between 1 and 26 options, found {num_options}")
  return [chr(ord("A") + i) for i in range(num_options)]


def _last_position(candidates: Sequence[str], position_of) -> str:
  """The candidate that occurs last in the response (first listed wins a tie, like np.argmax)."""
  positions = [position_of(c) for c in candidates]
  return candidates[positions.index(max(positions))]


def parse_multi_choice_response(
  response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], seed: str | None = None
) -> str:
  """MMMU's rule: "(A)" forms, else " A " forms, else option text (responses of > 5 words).

  Several hits resolve to the one that appears last; no hit falls back to a random choice drawn
  from `random.Random(seed)` (seed = sample id; None falls back to the first choice).
  """
  for char in (",", ".", "!", "?", ";", ":", "'"):  # one strip per char, in this order
    response = response.strip(char)
  response = f" {response} "  # pad so " A " also matches at the ends

  candidates = [c for c in all_choices if f"({c})" in response]
  by_bracket = bool(candidates)
  if not candidates:
    candidates = [c for c in all_choices if f" {c} " in response]
  by_content = False
  if not candidates and len(response.split()) > 5:
    lowered = response.lower()
    candidates = [c for c, text in index2ans.items() if text.lower() in lowered]
    by_content = bool(candidates)

  if not candidates:
    if seed is None:
      return all_choices[0]
    return random.Random(seed).choice(list(all_choices))
  if len(candidates) == 1:
    return candidates[0]
  if by_content:
    lowered = response.lower()
    return _last_position(candidates, lambda c: lowered.rfind(index2ans[c].lower()))
  if by_bracket:
    return _last_position(candidates, lambda c: response.rfind(f"({c})"))
  return _last_position(candidates, lambda c: response.rfind(f" {c} "))


_WHOLE_LETTER = re.compile(r"[\s*_`'\"(\[{]*([A-Za-z])[\s*_`'\")\]}.:,;!]*")
_LEADING_LABEL = re.compile(r"[\s*_`(\[]*([A-Z])(?:[)\]]|[.:](?!\d))")
_STATED_ANSWER = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*[*_`'\"]*[(\[]?([A-Z])(?![A-Za-z0-9])")
_TRAILING_PERIOD = re.compile(r"[.。]\s*$")
_ANSWER_PREFIX = re.compile(
  r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is\b|:)\s*", re.IGNORECASE
)


def parse_option_letter(prediction: str, options: Sequence[str]) -> str | None:
  """The option letter a prediction names, or None when it names none (or is ambiguous).

  Checked in order: the whole answer is one letter (optionally bracketed/bold/punctuated, any case);
  it starts with a label such as "B." / "(B)" / "B)"; it states "answer/option/choice (is) B" (the
  last such statement wins); it equals the text of exactly one option after VQA normalization,
  optionally after a leading "The answer is".
  """
  letters = option_letters(len(options))
  text = prediction.strip()

  match = _WHOLE_LETTER.fullmatch(text)
  if match and match.group(1).upper() in letters:
    return match.group(1).upper()
  match = _LEADING_LABEL.match(text)
  if match and match.group(1) in letters:
    return match.group(1)
  stated = [m for m in _STATED_ANSWER.findall(text) if m in letters]
  if stated:
    return stated[-1]

  target = normalize_vqa_answer(_TRAILING_PERIOD.sub("", _ANSWER_PREFIX.sub("", text)))
  if target:
    hits = [letter for letter, option in zip(letters, options) if normalize_vqa_answer(option) == target]
    if len(hits) == 1:
      return hits[0]
  return None


def option_accuracy(prediction: str, answer_letter: str, options: Sequence[str]) -> float:
  """1.0 when the prediction names the gold option letter."""
  return float(parse_option_letter(prediction, options) == answer_letter.strip().upper())
