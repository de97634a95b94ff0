"""Converters from each benchmark's official release format to the evaluation JSONL schema (schema.py).

    python -m nvlm_jax.evaluation.converters BENCH --in PATH [PATH ...] --out FILE.jsonl [--image-root DIR]

`--image-root` is the directory the release's own image paths are relative to (defaults below).
Images embedded in the release (VLMEvalKit TSV base64, HF parquet bytes) are written next to the
output as ``FILE_images/``. Image paths in the output are relative to the output file's directory.

| bench       | --in                                                     | default --image-root             |
|-------------|----------------------------------------------------------|----------------------------------|
| vqav2       | v2_OpenEnded_mscoco_<split>_questions.json [+ annotations] | its dir (<split>/COCO_<split>_<id>) |
| textvqa     | TextVQA_0.5.1_<split>.json                               | its dir (train_images/<id>.jpg)  |
| docvqa      | <split>_v1.0.json (SP-DocVQA)                            | its dir ("image": documents/..)  |
| infovqa     | infographicsVQA_<split>_v1.0*.json                       | its dir (image_local_name)       |
| chartqa     | test_human.json and/or test_augmented.json               | <its dir>/png                    |
| ai2d        | AI2D_TEST.tsv / AI2D_TEST_NO_MASK.tsv (VLMEvalKit)        | embedded base64                  |
| realworldqa | RealWorldQA.tsv (VLMEvalKit)                             | embedded base64                  |
| ocrbench    | OCRBench.json                                            | its dir (image_path)             |
| mmmu        | MMMU parquet files (one per subject) or JSON/JSONL rows  | embedded bytes                   |
| mathvista   | testmini parquet, or the JSON (dict by pid, or list)     | embedded bytes, else its dir     |
| gsm8k       | test.jsonl                                               | -                                |
| math        | MATH/test directory (or subject dirs / json files)       | -                                |
| humaneval   | HumanEval.jsonl(.gz)                                     | -                                |
| mmlu        | data/test directory or <subject>_test.csv files          | -                                |
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import glob
import gzip
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from nvlm_jax.evaluation.metrics.mmmu import subject_from_id
from nvlm_jax.evaluation.metrics.text_benchmarks import gsm8k_reference_answer, last_boxed_content
from nvlm_jax.evaluation.schema import Sample, write_samples


class ConversionError(ValueError):
  """The input does not look like the benchmark's official release; the message says where."""


# ----------------------------------------------------------------------------- file helpers


def _open_text(path: str):
  return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _load_json(path: str) -> Any:
  with _open_text(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e


def _load_json_list(path: str, expected: str) -> list:
  """A release file holding a list, either bare or under "data" (RRC/TextVQA style)."""
  data = _load_json(path)
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list):
    raise ConversionError(f"{path}: expected {expected}")
  return data


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  with _open_text(path) as f:
    for line_number, line in enumerate(f, start=1):
      if line.strip():
        try:
          yield line_number, json.loads(line)
        except json.JSONDecodeError as e:
          raise ConversionError(f"{path}:{line_number}: invalid JSON ({e.msg})") from e


def _read_rows(path: str) -> list[dict]:
  """Rows of a table: parquet (needs pyarrow), JSONL, or JSON (a list, {"data": [...]}, or a dict of rows)."""
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq
    except ImportError as e:
      raise ConversionError(
        f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the rows to JSON/JSONL first"
      ) from e
    return pq.read_table(path).to_pylist()
  if path.endswith((".jsonl", ".jsonl.gz")):
    return [row for _, row in _iter_jsonl(path)]
  data = _load_json(path)
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if isinstance(data, dict):
    data = list(data.values())
  if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
    raise ConversionError(f"{path}: expected a list of objects, {{'data': [...]}} or a dict of objects")
  return data


def _require(row: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
  missing = [k for k in keys if k not in row]
  if missing:
    raise ConversionError(f"{where}: missing field(s) {missing}; found {sorted(row)[:12]}")


def _image_format(data: bytes) -> str:
  if data.startswith(b"\x89PNG"):
    return ".png"
  if data.startswith(b"\xff\xd8"):
    return ".jpg"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return ".webp"
  if data[:6] in (b"GIF87a", b"GIF89a"):
    return ".gif"
  return ".bin"


def _save_image(data: bytes, directory: str, stem: str) -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, stem.replace(os.sep, "_") + _image_format(data))
  with open(path, "wb") as f:
    f.write(data)
  return path


def _image_value(value: Any, images_dir: str, stem: str, image_root: str, where: str) -> str:
  """An HF image cell ({"bytes", "path"} or a path string) -> an image file path."""
  if isinstance(value, Mapping):
    if value.get("bytes"):
      return _save_image(value["bytes"], images_dir, stem)
    value = value.get("path")
  if isinstance(value, str) and value:
    return os.path.join(image_root, value)
  raise ConversionError(f"{where}: image cell holds neither bytes nor a path")


class _Context:
  """What a converter needs besides its inputs: the image root and where embedded images go."""

  def __init__(self, inputs: Sequence[str], out_path: str, image_root: str | None):
    self.inputs = list(inputs)
    self.out_path = out_path
    self.image_root = image_root
    self.images_dir = os.path.splitext(out_path)[0] + "_images"

  def root(self, path: str, default_subdir: str = "") -> str:
    if self.image_root is not None:
      return self.image_root
    return os.path.join(os.path.dirname(os.path.abspath(path)), default_subdir)


def _answers(value: Any) -> list[str]:
  if value is None:
    return []
  if isinstance(value, list):
    return [str(v) for v in value]
  return [str(value)]


# ----------------------------------------------------------------------------- VQA-style JSON


def convert_vqav2(ctx: _Context) -> list[Sample]:
  questions, annotations = None, None
  for path in ctx.inputs:
    data = _load_json(path)
    if isinstance(data, dict) and "questions" in data:
      questions = (path, data)
    elif isinstance(data, dict) and "annotations" in data:
      annotations = (path, data)
    else:
      raise ConversionError(
        f"{path}: neither a VQAv2 questions file ('questions') nor an annotations file ('annotations')"
      )
  if questions is None:
    raise ConversionError("vqav2 needs the questions JSON (and, for labelled splits, the annotations JSON)")
  q_path, q_data = questions
  subtype = q_data.get("data_subtype", "")
  image_subtype = "test2015" if subtype.startswith("test-dev") else subtype  # test-dev images live in test2015
  by_question = {}
  if annotations is not None:
    by_question = {a["question_id"]: a for a in annotations[1]["annotations"]}
  root = ctx.root(q_path)
  samples = []
  for i, q in enumerate(q_data["questions"]):
    _require(q, ("question_id", "image_id", "question"), f"{q_path} questions[{i}]")
    sample = {
      "id": str(q["question_id"]),
      "question": q["question"],
      "image_id": q["image_id"],
      "images": [os.path.join(root, image_subtype, f"COCO_{image_subtype}_{q['image_id']:012d}.jpg")],
    }
    if annotations is not None:
      ann = by_question.get(q["question_id"])
      if ann is None:
        raise ConversionError(f"{annotations[0]}: no annotation for question_id {q['question_id']}")
      sample.update(
        answers=[a["answer"] for a in ann["answers"]],
        category=ann.get("answer_type"),
        question_type=ann.get("question_type"),
      )
      if sample["category"] is None:
        del sample["category"]
    samples.append(sample)
  return samples


def convert_textvqa(ctx: _Context) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    data = _load_json(path)
    folder = "test_images" if isinstance(data, dict) and data.get("dataset_type") == "test" else "train_images"
    root = ctx.root(path)
    for i, item in enumerate(_load_json_list(path, "a TextVQA JSON with a 'data' list")):
      _require(item, ("question_id", "image_id", "question"), f"{path} data[{i}]")
      samples.append(
        {
          "id": str(item["question_id"]),
          "question": item["question"],
          "images": [os.path.join(root, folder, f"{item['image_id']}.jpg")],
          "answers": _answers(item.get("answers")),
        }
      )
  return samples


def _convert_rrc(ctx: _Context, image_key: str, category_key: str) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    root = ctx.root(path)
    for i, item in enumerate(_load_json_list(path, "a JSON with a 'data' list (DocVQA/InfoVQA release)")):
      _require(item, ("questionId", "question", image_key), f"{path} data[{i}]")
      sample = {
        "id": str(item["questionId"]),
        "question": item["question"],
        "images": [os.path.join(root, item[image_key])],
        "answers": _answers(item.get("answers")),
      }
      if item.get(category_key):
        sample["category"] = _answers(item[category_key])
      samples.append(sample)
  return samples


def convert_docvqa(ctx: _Context) -> list[Sample]:
  return _convert_rrc(ctx, image_key="image", category_key="question_types")


def convert_infovqa(ctx: _Context) -> list[Sample]:
  return _convert_rrc(ctx, image_key="image_local_name", category_key="answer_type")


def convert_chartqa(ctx: _Context) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    split = os.path.splitext(os.path.basename(path))[0].removeprefix("test_").removeprefix("val_")
    root = ctx.root(path, "png")
    for i, item in enumerate(_load_json_list(path, "a ChartQA list of {imgname, query, label}")):
      _require(item, ("imgname", "query", "label"), f"{path}[{i}]")
      samples.append(
        {
          "id": f"{split}_{i}",
          "question": item["query"],
          "answers": [str(item["label"])],
          "images": [os.path.join(root, item["imgname"])],
          "category": split,
        }
      )
  return samples


def convert_ocrbench(ctx: _Context) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    root = ctx.root(path)
    for i, item in enumerate(_load_json_list(path, "the OCRBench list of questions")):
      _require(item, ("dataset_name", "image_path", "question", "answers", "type"), f"{path}[{i}]")
      samples.append(
        {
          "id": str(item.get("id", i)),
          "question": item["question"],
          "images": [os.path.join(root, item["image_path"])],
          "answers": _answers(item["answers"]),
          "category": item["type"],
          "dataset_name": item["dataset_name"],
        }
      )
  return samples


# ----------------------------------------------------------------------------- VLMEvalKit TSV


def _read_tsv(path: str) -> list[dict[str, str]]:
  csv.field_size_limit(2**31 - 1)  # base64 images are far longer than the default 128 KiB
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


def _tsv_images(rows: list[dict[str, str]], path: str, ctx: _Context) -> dict[str, list[str]]:
  """index -> image files. A cell holds base64, a list of base64 strings, or (<= 64 chars) the
  index of the row whose image it shares, as VLMEvalKit stores them."""
  cells = {row["index"]: row.get("image", "") for row in rows}
  files: dict[str, list[str]] = {}

  def decode(index: str) -> list[str]:
    if index not in files:
      cell = cells[index]
      if len(cell) <= 64:
        if cell not in cells or len(cells[cell]) <= 64:
          raise ConversionError(f"{path}: row index {index}: image refers to {cell!r}, which holds no image")
        files[index] = decode(cell)
      else:
        blobs = ast.literal_eval(cell) if cell.startswith("[") else [cell]
        stems = [index] if len(blobs) == 1 else [f"{index}_{k}" for k in range(len(blobs))]
        files[index] = [_save_image(base64.b64decode(b), ctx.images_dir, s) for b, s in zip(blobs, stems)]
    return files[index]

  root = ctx.root(path)
  for row in rows:
    if row.get("image"):
      decode(row["index"])
    elif row.get("image_path"):
      paths = ast.literal_eval(row["image_path"]) if row["image_path"].startswith("[") else [row["image_path"]]
      files[row["index"]] = [os.path.join(root, p) for p in paths]
    else:
      raise ConversionError(f"{path}: row index {row['index']}: neither 'image' nor 'image_path'")
  return files


def convert_vlmevalkit_mcq(ctx: _Context) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    rows = _read_tsv(path)
    if rows:
      _require(rows[0], ("index", "question", "A", "answer"), f"{path} header")
    images = _tsv_images(rows, path, ctx)
    for row in rows:
      options = []
      for letter in (chr(ord("A") + k) for k in range(26)):
        if not row.get(letter):  # empty cell = NaN in pandas: no such option
          break
        options.append(row[letter])
      sample = {
        "id": row["index"],
        "question": row["question"],
        "images": images[row["index"]],
        "options": options,
        "answers": _answers(row["answer"] or None),
      }
      for key in ("category", "l2-category", "hint", "split"):
        if row.get(key):
          sample[key.replace("-", "_")] = row[key]
      samples.append(sample)
  return samples


# ----------------------------------------------------------------------------- HF tables (MMMU, MathVista)


def _literal_list(value: Any, where: str) -> list:
  if isinstance(value, list):
    return value
  if isinstance(value, str):
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      raise ConversionError(f"{where}: cannot parse list {value[:60]!r}") from e
    if isinstance(parsed, list):
      return parsed
  raise ConversionError(f"{where}: expected a list, found {type(value).__name__}")


def convert_mmmu(ctx: _Context) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    root = ctx.root(path)
    for i, row in enumerate(_read_rows(path)):
      where = f"{path} row {i}"
      _require(row, ("id", "question", "options", "answer", "question_type"), where)
      answer = row["answer"]
      if isinstance(answer, str) and answer.startswith("[") and answer.endswith("]"):
        answer = _literal_list(answer, where)  # open questions with several accepted answers
      images = [
        _image_value(row[key], ctx.images_dir, f"{row['id']}_{key}", root, where)
        for key in (f"image_{k}" for k in range(1, 8))
        if row.get(key)
      ]
      sample = {
        "id": row["id"],
        "question": row["question"],
        "images": images,
        "answers": _answers(answer),
        "question_type": row["question_type"],
        "category": subject_from_id(row["id"]),
      }
      options = [str(o) for o in _literal_list(row["options"], where)]
      if options:
        sample["options"] = options
      for key in ("subfield", "topic_difficulty", "img_type"):
        if row.get(key) is not None:
          sample[key] = row[key]
      samples.append(sample)
  return samples


def convert_mathvista(ctx: _Context) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    root = ctx.root(path)
    for i, row in enumerate(_read_rows(path)):
      where = f"{path} row {i}"
      _require(row, ("pid", "question", "question_type"), where)
      decoded = row.get("decoded_image")
      image = decoded if isinstance(decoded, Mapping) and decoded.get("bytes") else row.get("image")
      sample = {
        "id": str(row["pid"]),
        "question": row["question"],
        "images": [_image_value(image, ctx.images_dir, f"mathvista_{row['pid']}", root, where)],
        "question_type": row["question_type"],
      }
      answer = row.get("answer")
      choices = row.get("choices")
      if row["question_type"] == "multi_choice":
        if not choices:
          raise ConversionError(f"{where} (pid {row['pid']}): multi_choice question without choices")
        sample["options"] = [str(c) for c in choices]
        if answer not in (None, ""):
          if answer not in choices:
            raise ConversionError(f"{where} (pid {row['pid']}): answer {answer!r} is not one of the choices")
          sample["answers"] = [chr(ord("A") + list(choices).index(answer))]
          sample["answer_text"] = str(answer)
      elif answer not in (None, ""):
        sample["answers"] = [str(answer)]
      for key in ("query", "answer_type", "unit", "precision"):
        if row.get(key) is not None:
          sample[key] = row[key]
      metadata = row.get("metadata") or {}
      if metadata.get("task"):
        sample["category"] = metadata["task"]
      if metadata.get("skills"):
        sample["skills"] = list(metadata["skills"])
      samples.append(sample)
  return samples


# ----------------------------------------------------------------------------- text benchmarks


def convert_gsm8k(ctx: _Context) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    stem = os.path.basename(path).split(".")[0]
    for line_number, row in _iter_jsonl(path):
      _require(row, ("question", "answer"), f"{path}:{line_number}")
      try:
        final = gsm8k_reference_answer(row["answer"])
      except ValueError as e:
        raise ConversionError(f"{path}:{line_number}: {e}") from e
      samples.append(
        {
          "id": f"gsm8k_{stem}_{len(samples)}",
          "question": row["question"],
          "images": [],
          "answers": [final],
          "solution": row["answer"],
        }
      )
  return samples


def _expand(inputs: Iterable[str], pattern: str) -> list[str]:
  files = []
  for path in inputs:
    files.extend(
      sorted(glob.glob(os.path.join(path, "**", pattern), recursive=True)) if os.path.isdir(path) else [path]
    )
  return files


def convert_math(ctx: _Context) -> list[Sample]:
  samples = []
  for path in _expand(ctx.inputs, "*.json"):
    row = _load_json(path)
    _require(row, ("problem", "solution"), path)
    answer = last_boxed_content(row["solution"])
    if answer is None:
      raise ConversionError(f"{path}: the solution has no \\boxed{{...}} answer")
    subject_dir, stem = os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]
    sample = {
      "id": f"{subject_dir}/{stem}",
      "question": row["problem"],
      "images": [],
      "answers": [answer],
      "solution": row["solution"],
    }
    if row.get("type"):
      sample["category"] = row["type"]
    if row.get("level"):
      sample["level"] = row["level"]
    samples.append(sample)
  return samples


def convert_humaneval(ctx: _Context) -> list[Sample]:
  samples = []
  for path in ctx.inputs:
    for line_number, row in _iter_jsonl(path):
      _require(row, ("task_id", "prompt", "test", "entry_point"), f"{path}:{line_number}")
      samples.append(
        {
          "id": row["task_id"],
          "question": row["prompt"],
          "images": [],
          "answers": _answers(row.get("canonical_solution")),
          "test": row["test"],
          "entry_point": row["entry_point"],
        }
      )
  return samples


def convert_mmlu(ctx: _Context) -> list[Sample]:
  samples = []
  for path in _expand(ctx.inputs, "*.csv"):
    subject = os.path.splitext(os.path.basename(path))[0]
    for suffix in ("_test", "_val", "_dev"):
      subject = subject.removesuffix(suffix)
    with open(path, encoding="utf-8", newline="") as f:
      for row_number, row in enumerate(csv.reader(f), start=1):
        if len(row) != 6:
          raise ConversionError(
            f"{path}:{row_number}: expected 6 columns (question, A, B, C, D, answer), found {len(row)}"
          )
        if row[5].strip() not in ("A", "B", "C", "D"):
          raise ConversionError(f"{path}:{row_number}: answer {row[5]!r} is not A-D")
        samples.append(
          {
            "id": f"{subject}_{row_number - 1}",
            "question": row[0],
            "images": [],
            "options": row[1:5],
            "answers": [row[5].strip()],
            "category": subject,
          }
        )
  return samples


CONVERTERS: dict[str, Callable[[_Context], list[Sample]]] = {
  "vqav2": convert_vqav2,
  "textvqa": convert_textvqa,
  "docvqa": convert_docvqa,
  "infovqa": convert_infovqa,
  "chartqa": convert_chartqa,
  "ai2d": convert_vlmevalkit_mcq,
  "realworldqa": convert_vlmevalkit_mcq,
  "ocrbench": convert_ocrbench,
  "mmmu": convert_mmmu,
  "mathvista": convert_mathvista,
  "gsm8k": convert_gsm8k,
  "math": convert_math,
  "humaneval": convert_humaneval,
  "mmlu": convert_mmlu,
}


def convert(
  benchmark: str,
  inputs: Sequence[str | os.PathLike],
  out_path: str | os.PathLike,
  image_root: str | os.PathLike | None = None,
) -> list[Sample]:
  """Convert official release file(s) to `out_path` (JSONL); return the samples as written."""
  if benchmark not in CONVERTERS:
    raise KeyError(f"no converter for {benchmark!r}; known: {sorted(CONVERTERS)}")
  out_path = os.fspath(out_path)
  for path in inputs:
    if not os.path.exists(path):
      raise ConversionError(f"{benchmark}: input {os.fspath(path)!r} does not exist")
  ctx = _Context(
    [os.fspath(p) for p in inputs], out_path, None if image_root is None else os.path.abspath(os.fspath(image_root))
  )
  samples = CONVERTERS[benchmark](ctx)
  seen: set[str] = set()
  out_dir = os.path.dirname(os.path.abspath(out_path))
  for sample in samples:
    if sample["id"] in seen:
      raise ConversionError(f"{benchmark}: duplicate sample id {sample['id']!r} across the inputs")
    seen.add(sample["id"])
    sample["images"] = [os.path.relpath(os.path.abspath(p), out_dir) for p in sample["images"]]
  os.makedirs(out_dir, exist_ok=True)
  write_samples(out_path, samples)
  return samples


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m nvlm_jax.evaluation.converters",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("benchmark", choices=sorted(CONVERTERS))
  parser.add_argument("--in", dest="inputs", nargs="+", required=True, help="official release file(s)/dir(s)")
  parser.add_argument("--out", required=True, help="output JSONL")
  parser.add_argument("--image-root", help="directory the release's image paths are relative to")
  args = parser.parse_args(argv)
  try:
    samples = convert(args.benchmark, args.inputs, args.out, args.image_root)
  except (ConversionError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {len(samples)} {args.benchmark} samples to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
