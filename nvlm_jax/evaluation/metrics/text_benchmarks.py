"""Text-only benchmarks NVLM reports (paper Table 8): MMLU, GSM8K and MATH (HumanEval: humaneval.py).

* MMLU (hendrycks/test): accuracy of the option letter; the letter is read with `parse_option_letter`.
* GSM8K (openai/grade-school-math `grade_school_math/dataset.py`): the official answer follows "#### "
  with thousands commas removed. Chat models rarely write "####", so the prediction's final answer is,
  in order: the number after the last "####", after the last "answer is", inside the last \\boxed{},
  else the last number in the text; a Unicode minus (U+2212) counts as "-"; "$", commas and a trailing
  period are dropped and the two numbers are compared by value (the official script compares the
  strings, so "18.00" != "18" there).
* MATH (hendrycks/math `modeling/math_equivalence.py`, `modeling/dataset/util.py`,
  `modeling/eval_math_gpt.py::remove_boxed`): the last \\boxed/\\fbox of the response with balanced braces,
  whose content counts only in the form "\\boxed{...}"; compared to the reference solution's boxed content
  after Hendrycks' `_strip_string` normalization (`is_equiv`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from nvlm_jax.evaluation.metrics.multiple_choice import parse_option_letter

# ----------------------------------------------------------------------------- MMLU


def mmlu_correct(prediction: str, answer_letter: str, options: Sequence[str]) -> bool:
  return parse_option_letter(prediction, options) == answer_letter.strip().upper()


# ----------------------------------------------------------------------------- GSM8K

_FINAL_MARK = re.compile(r"####\s*\$?\s*(-?[0-9.,]+)")
_ANSWER_IS = re.compile(r"answer is[^0-9\-]{0,20}?(-?\$?\s?-?[0-9][0-9,]*(?:\.[0-9]+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\$?\s?-?[0-9][0-9,]*(?:\.[0-9]+)?")


def _clean_number(text: str) -> str:
  text = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
  return "-" + text.lstrip("-") if text.count("-") else text


def gsm8k_reference_answer(solution: str) -> str:
  """The official GSM8K answer: text after "#### ", commas removed."""
  match = _FINAL_MARK.search(solution)
  if not match:
    raise ValueError(f"GSM8K solution has no '#### <number>' line: {solution[-80:]!r}")
  return _clean_number(match.group(1))


def extract_gsm8k_answer(text: str) -> str | None:
  """The final number of a GSM8K response (see module docstring for the order), or None."""
  text = text.replace("\u2212", "-")
  for pattern in (_FINAL_MARK, _ANSWER_IS):
    found = pattern.findall(text)
    if found:
      return _clean_number(found[-1])
  boxed = last_boxed_content(text)
  if boxed is not None:
    numbers = _NUMBER.findall(boxed)
    if numbers:
      return _clean_number(numbers[-1])
  numbers = _NUMBER.findall(text)
  return _clean_number(numbers[-1]) if numbers else None


def numbers_equal(a: str | None, b: str | None) -> bool:
  if a is None or b is None:
    return False
  try:
    return Decimal(a) == Decimal(b)
  except InvalidOperation:
    return a == b


def gsm8k_correct(prediction: str, answer: str) -> bool:
  return numbers_equal(extract_gsm8k_answer(prediction), _clean_number(answer))


# ----------------------------------------------------------------------------- MATH


def last_boxed_only_string(text: str) -> str | None:
  """The last "\\boxed{...}" (or "\\fbox{...}") with balanced braces, command included; or None."""
  start = text.rfind("\\boxed")
  if start < 0:
    start = text.rfind("\\fbox")
    if start < 0:
      return None
  depth = 0
  for end in range(start, len(text)):
    if text[end] == "{":
      depth += 1
    elif text[end] == "}":
      depth -= 1
      if depth == 0:
        return text[start : end + 1]
  return None


def remove_boxed(boxed: str | None, extended: bool = False) -> str | None:
  """Hendrycks' `remove_boxed`: "\\boxed{x}" -> "x"; any other form (including "\\fbox{x}" and the
  brace-less "\\boxed 5") gives None. extended=True also reads "\\fbox{x}" (as lm-evaluation-harness)."""
  if boxed is None:
    return None
  if boxed.startswith("\\boxed{") and boxed.endswith("}"):
    return boxed[len("\\boxed{") : -1]
  if extended and boxed.startswith("\\fbox{") and boxed.endswith("}"):
    return boxed[len("\\fbox{") : -1]
  return None


def last_boxed_content(text: str, extended: bool = False) -> str | None:
  """Content of the last box. extended=True reads a brace-less last "\\boxed x" up to the next "$"."""
  start = text.rfind("\\boxed")
  if extended and text.startswith("\\boxed ", start):
    return text[start + len("\\boxed ") :].split("$")[0]
  return remove_boxed(last_boxed_only_string(text), extended)


def _fix_fracs(text: str) -> str:
  r"""\frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; leaves \frac{..}{..} alone."""
  head, *tails = text.split("\\frac")
  out = head
  for tail in tails:
    out += "\\frac"
    if tail[0] == "{":  # IndexError on an empty tail: caught by is_equiv, as in the reference
      out += tail
      continue
    if len(tail) < 2:
      return text
    numerator, second, rest = tail[0], tail[1], tail[2:]
    if second != "{":
      out += "{" + numerator + "}{" + second + "}" + rest
    else:
      out += "{" + numerator + "}" + second + rest
  return out


def _fix_a_slash_b(text: str) -> str:
  """ "3/4" -> "\\frac{3}{4}" when both sides are plain integers written canonically."""
  parts = text.split("/")
  if len(parts) != 2:
    return text
  try:
    numerator, denominator = int(parts[0]), int(parts[1])
  except ValueError:
    return text
  if text != f"{numerator}/{denominator}":
    return text
  return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def _remove_right_units(text: str) -> str:
  # "\text{ " introduces units in MATH answers; the reference asserts it occurs at most once.
  if "\\text{ " in text:
    parts = text.split("\\text{ ")
    if len(parts) != 2:
      raise ValueError("more than one '\\text{ ' unit marker")
    return parts[0]
  return text


def _fix_sqrt(text: str) -> str:
  r"""\sqrt3 -> \sqrt{3}."""
  if "\\sqrt" not in text:
    return text
  head, *tails = text.split("\\sqrt")
  out = head
  for tail in tails:  # IndexError on an empty tail: caught by is_equiv
    out += "\\sqrt" + (tail if tail[0] == "{" else "{" + tail[0] + "}" + tail[1:])
  return out


_TRAILING_ZEROS = re.compile(r"^(-?\d+)\.0+$|^(-?\d+\.\d*?[1-9])0+$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")


def strip_math_answer(text: str, extended: bool = False) -> str:
  """Hendrycks `_strip_string` (it removes "\\%" but keeps a bare "%"). With extended=True, afterwards also
  unwrap \\text{..}/\\mbox{..}, drop a bare "%", thousands commas in plain numbers ("1,000" -> "1000")
  and trailing decimal zeros ("2.50" -> "2.5", "3.0" -> "3") — normalizations later harnesses add."""
  text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
  text = text.replace("tfrac", "frac").replace("dfrac", "frac")
  text = text.replace("\\left", "").replace("\\right", "")
  text = text.replace("^{\\circ}", "").replace("^\\circ", "")
  text = text.replace("\\$", "")
  text = _remove_right_units(text)
  text = text.replace("\\%", "")
  text = text.replace(" .", " 0.").replace("{.", "{0.")
  if not text:
    return text
  if text[0] == ".":
    text = "0" + text
  sides = text.split("=")
  if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> " 5"
    text = sides[1]
  text = _fix_sqrt(text)
  text = text.replace(" ", "")
  text = _fix_fracs(text)
  if text == "0.5":
    text = "\\frac{1}{2}"
  text = _fix_a_slash_b(text)
  if extended:
    text = _TEXT_WRAPPER.sub(r"\1", text).replace("%", "")
    if _THOUSANDS.match(text):
      text = text.replace(",", "")
    match = _TRAILING_ZEROS.match(text)
    if match:
      text = match.group(1) or match.group(2)
  return text


def is_equiv(a: str | None, b: str | None, extended: bool = False) -> bool:
  """Hendrycks `is_equiv`: equal after normalization; raw equality when normalization fails."""
  if a is None and b is None:
    return True
  if a is None or b is None:
    return False
  try:
    return strip_math_answer(a, extended) == strip_math_answer(b, extended)
  except Exception:  # noqa: BLE001 - the reference falls back on *any* normalization failure
    return a == b


def math_correct(prediction: str, answer: str, extended: bool = False) -> bool:
  """`answer` is the reference's boxed content (converters store it that way)."""
  return is_equiv(last_boxed_content(prediction, extended), answer, extended)
