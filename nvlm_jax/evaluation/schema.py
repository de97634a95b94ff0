"""The one on-disk format for evaluation samples: JSON Lines, one object per sample.

    {"id": "123",                      # required, non-empty string, unique in the file
     "images": ["val2014/x.jpg"],      # required list of strings (may be empty): paths relative to
                                       #   the JSONL file's directory, or absolute
     "question": "What is ...?",       # required string: the benchmark's raw question
     "answers": ["two", "2"],          # ground truths (list of strings) -- or "answer": "2";
                                       #   absent for unlabelled test splits
     "options": ["cat", "dog"],        # optional: multiple-choice option texts, in letter order A, B, ...
     "category": "number",             # optional string or list of strings: per-category scores
     ...}                              # anything else a benchmark needs (question_type, test, ...)

`load_samples` validates every line and reports ``file:line: problem`` for each bad one; loaded
samples always carry "answers" (a list, possibly empty) and no "answer", and their image paths are
absolute. The `<image>` marks of a prompt refer to ``images`` in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Sample = dict[str, Any]
MAX_REPORTED_ERRORS = 20


class SchemaError(ValueError):
  """A JSONL file does not follow the evaluation schema; the message lists file:line: problem."""


def _is_str_list(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _describe(value: Any) -> str:
  text = json.dumps(value, ensure_ascii=False)
  return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def validate_sample(obj: Any) -> tuple[Sample | None, list[str]]:
  """Check one decoded JSON value; return (normalized sample, []) or (None, problems)."""
  if not isinstance(obj, dict):
    return None, [f"expected a JSON object, found {_describe(obj)}"]
  problems = []
  if not isinstance(obj.get("id"), str) or not obj.get("id"):
    problems.append(f"'id' must be a non-empty string, found {_describe(obj.get('id'))}")
  if not _is_str_list(obj.get("images")):
    problems.append(f"'images' must be a list of strings, found {_describe(obj.get('images'))}")
  if not isinstance(obj.get("question"), str):
    problems.append(f"'question' must be a string, found {_describe(obj.get('question'))}")
  if "answers" in obj and "answer" in obj:
    problems.append("give either 'answers' or 'answer', not both")
  answers = obj.get("answers", obj.get("answer", []))
  if isinstance(answers, str):
    answers = [answers]
  if not _is_str_list(answers):
    problems.append(f"'answers'/'answer' must be a string or a list of strings, found {_describe(answers)}")
  if "options" in obj and not (_is_str_list(obj["options"]) and 0 < len(obj["options"]) <= 26):
    problems.append(f"'options' must be a list of 1 to 26 strings, found {_describe(obj['options'])}")
  category = obj.get("category")
  if category is not None and not (isinstance(category, str) or _is_str_list(category)):
    problems.append(f"'category' must be a string or a list of strings, found {_describe(category)}")
  if problems:
    return None, problems
  sample = {k: v for k, v in obj.items() if k != "answer"}
  sample["answers"] = list(answers)
  return sample, []


def _resolve(images: list[str], base_dir: str) -> list[str]:
  return [p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p)) for p in images]


def read_checked_jsonl(
  path: str | os.PathLike, check: Callable[[Any], tuple[Any, list[str]]], error_type: type[ValueError], what: str
) -> list[dict[str, Any]]:
  """Read a JSONL file of objects with unique "id"s, checking each with `check(obj) -> (row, problems)`.

  Collects every problem as ``file:line (id 'x'): problem`` and raises `error_type` listing them (up
  to MAX_REPORTED_ERRORS) once the whole file has been read.
  """
  path = os.fspath(path)
  rows: list[dict[str, Any]] = []
  errors: list[str] = []
  first_line_of: dict[str, int] = {}
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        errors.append(f"{path}:{line_number}: not UTF-8 text (byte {e.start} of the line: {e.reason})")
        continue
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        errors.append(f"{path}:{line_number}: invalid JSON ({e.msg} at column {e.colno})")
        continue
      row, problems = check(obj)
      if not problems and row["id"] in first_line_of:
        problems = [f"duplicate id {row['id']!r} (first seen on line {first_line_of[row['id']]})"]
      if problems:
        where = f" (id {obj['id']!r})" if isinstance(obj, dict) and isinstance(obj.get("id"), str) else ""
        errors.extend(f"{path}:{line_number}{where}: {p}" for p in problems)
        continue
      first_line_of[row["id"]] = line_number
      rows.append(row)
  if errors:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    raise error_type(f"{len(errors)} invalid {what} line(s) in {path}:\n" + "\n".join(shown) + more)
  return rows


def load_samples(path: str | os.PathLike, resolve_images: bool = True, check_images: bool = False) -> list[Sample]:
  """Read and validate a samples JSONL file; raise SchemaError listing every bad line (up to 20).

  resolve_images: make image paths absolute (relative ones are relative to the file's directory).
  check_images: also require every image file to exist.
  """
  base_dir = os.path.dirname(os.path.abspath(path))

  def check(obj: Any) -> tuple[Sample | None, list[str]]:
    sample, problems = validate_sample(obj)
    if problems:
      return None, problems
    resolved = _resolve(sample["images"], base_dir)
    missing = [p for p in resolved if check_images and not os.path.isfile(p)]
    if missing:
      return None, [f"image file(s) not found: {missing}"]
    if resolve_images:
      sample["images"] = resolved
    return sample, []

  return read_checked_jsonl(path, check, SchemaError, "sample")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
  """Write one JSON object per line (UTF-8, not ASCII-escaped); return the number of rows."""
  count = 0
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
      count += 1
  return count


def write_samples(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> int:
  """Validate then write samples; raise SchemaError naming the first bad sample."""
  checked = []
  for index, sample in enumerate(samples):
    normalized, problems = validate_sample(dict(sample))
    if problems:
      raise SchemaError(f"sample #{index} (id {sample.get('id')!r}) for {os.fspath(path)}: " + "; ".join(problems))
    checked.append(normalized)
  return write_jsonl(path, checked)
