"""Evaluation data: the JSONL schema and its loader, predictions I/O, converters, score_file."""

import base64
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nvlm_jax.evaluation import (
  PredictionsError,
  SchemaError,
  load_samples,
  merge_predictions,
  read_predictions,
  score_file,
  write_predictions,
  write_samples,
)
from nvlm_jax.evaluation.converters import ConversionError, convert
from nvlm_jax.evaluation.runner import main as runner_main


def _write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
  return path


def _png_bytes(color=(255, 0, 0)):
  buffer = io.BytesIO()
  Image.new("RGB", (2, 2), color).save(buffer, format="PNG")
  return buffer.getvalue()


# ----------------------------------------------------------------------------- schema


def test_load_samples_validates_and_normalizes(tmp_path):
  path = _write(
    tmp_path / "d" / "s.jsonl",
    "\n".join(
      json.dumps(o)
      for o in [
        {"id": "1", "images": ["img/a.jpg"], "question": "q", "answer": "yes"},
        {
          "id": "2",
          "images": ["/abs/b.jpg"],
          "question": "q",
          "answers": ["a", "b"],
          "options": ["x", "y"],
          "category": ["c1", "c2"],
          "extra": 3,
        },
        {"id": "3", "images": [], "question": "unlabelled"},
      ]
    )
    + "\n\n",
  )
  samples = load_samples(path)
  assert [s["answers"] for s in samples] == [["yes"], ["a", "b"], []]
  assert "answer" not in samples[0] and samples[1]["extra"] == 3
  assert samples[0]["images"] == [str(tmp_path / "d" / "img" / "a.jpg")]  # relative to the file
  assert samples[1]["images"] == ["/abs/b.jpg"]
  assert load_samples(path, resolve_images=False)[0]["images"] == ["img/a.jpg"]
  with pytest.raises(SchemaError, match="image file"):
    load_samples(path, check_images=True)


def test_load_samples_reports_file_line_and_problem(tmp_path):
  path = _write(
    tmp_path / "bad.jsonl",
    "\n".join(
      [
        json.dumps({"id": "ok", "images": [], "question": "q", "answers": ["a"]}),
        "{not json",
        json.dumps({"id": 7, "images": [], "question": "q"}),
        json.dumps({"id": "a", "images": "x.jpg", "question": "q"}),
        json.dumps({"id": "b", "images": [], "question": "q", "answer": "x", "answers": ["x"]}),
        json.dumps({"id": "c", "images": [], "question": "q", "answers": [1]}),
        json.dumps({"id": "d", "images": [], "question": "q", "options": []}),
        json.dumps({"id": "ok", "images": [], "question": "q"}),
        json.dumps(["not", "an", "object"]),
      ]
    ),
  )
  with pytest.raises(SchemaError) as info:
    load_samples(path)
  message = str(info.value)
  assert "8 invalid sample line(s)" in message
  for line, problem in [
    (2, "invalid JSON"),
    (3, "'id' must be a non-empty string, found int 7"),
    (4, "'images' must be a list of strings"),
    (5, "either 'answers' or 'answer'"),
    (6, "'answers'/'answer' must be"),
    (7, "'options' must be a list of 1 to 26"),
    (8, "duplicate id 'ok' (first seen on line 1)"),
    (9, "expected a JSON object"),
  ]:
    assert f"{path}:{line}" in message and problem in message, (line, problem)
  with pytest.raises(SchemaError, match="sample #0"):
    write_samples(tmp_path / "w.jsonl", [{"id": "", "images": [], "question": "q"}])


# ----------------------------------------------------------------------------- predictions


def test_predictions_roundtrip_merge_and_errors(tmp_path):
  path = tmp_path / "p.jsonl"
  write_predictions(path, [{"id": "1", "prediction": "two"}, {"id": "2", "prediction": ["a", "b"]}])
  assert read_predictions(path) == [{"id": "1", "prediction": "two"}, {"id": "2", "prediction": ["a", "b"]}]
  with pytest.raises(PredictionsError, match="prediction #0"):
    write_predictions(path, [{"id": "1", "prediction": 3}])
  _write(path, '{"id": "1", "prediction": "x"}\n{"id": "1", "prediction": "y"}\n{"id": "2"}\n')
  with pytest.raises(PredictionsError) as info:
    read_predictions(path)
  assert f"{path}:2 (id '1'): duplicate id '1' (first seen on line 1)" in str(info.value)
  assert f"{path}:3 (id '2'): 'prediction' must be" in str(info.value)

  samples = [
    {"id": "1", "images": [], "question": "q", "answers": ["2"]},
    {"id": "2", "images": [], "question": "q", "answers": ["3"]},
  ]
  merged = merge_predictions([{"id": "2", "prediction": "3", "answers": ["ignored"]}], samples, allow_missing=True)
  assert merged == [{"id": "2", "prediction": "3", "images": [], "question": "q", "answers": ["3"]}]
  with pytest.raises(PredictionsError, match="have no prediction"):
    merge_predictions([{"id": "2", "prediction": "3"}], samples)
  with pytest.raises(PredictionsError, match="not in the samples"):
    merge_predictions([{"id": "9", "prediction": "3"}], samples)


def test_score_file_and_cli(tmp_path, capsys):
  data = tmp_path / "data.jsonl"
  write_samples(
    data,
    [
      {
        "id": str(i),
        "images": [f"{i}.jpg"],
        "question": "How many?",
        "answers": ["2"] * 9 + ["3"],
        "category": "number",
      }
      for i in range(4)
    ],
  )
  preds = tmp_path / "preds.jsonl"
  write_predictions(
    preds, [{"id": "0", "prediction": "two"}, {"id": "1", "prediction": "2."}, {"id": "2", "prediction": "three"}]
  )
  summary = score_file("vqav2", preds, data, allow_missing=True)
  # Official leave-one-out: "three" matches one other answer in 9 of the 10 subsets -> 0.3.
  assert summary["score"] == pytest.approx(100 * (1 + 1 + 0.3) / 3)
  assert summary["num_samples"] == 3 and summary["num_missing"] == 1
  with pytest.raises(PredictionsError, match="1 sample"):
    score_file("vqav2", preds, data)
  out = tmp_path / "summary.json"
  assert (
    runner_main(
      [
        "--benchmark",
        "vqav2",
        "--predictions",
        str(preds),
        "--data",
        str(data),
        "--allow-missing",
        "--option",
        "scorer=megatron",
        "--output",
        str(out),
      ]
    )
    == 0
  )
  # Megatron: "three" matches 1 of the 10 answers -> 1/3.
  assert json.loads(out.read_text())["score"] == pytest.approx(100 * (1 + 1 + 1 / 3) / 3)
  assert '"benchmark": "vqav2"' in capsys.readouterr().out


# ----------------------------------------------------------------------------- converters


def _convert(tmp_path, bench, inputs, **kwargs):
  out = tmp_path / "out" / f"{bench}.jsonl"
  convert(bench, [str(p) for p in inputs], out, **kwargs)
  return load_samples(out), out


def test_convert_vqav2_with_and_without_annotations(tmp_path):
  questions = _write(
    tmp_path / "v2_q.json",
    {
      "data_subtype": "val2014",
      "questions": [{"image_id": 42, "question": "What color is the bus?", "question_id": 420}],
    },
  )
  annotations = _write(
    tmp_path / "v2_a.json",
    {
      "annotations": [
        {
          "question_id": 420,
          "image_id": 42,
          "question_type": "what color",
          "answer_type": "other",
          "multiple_choice_answer": "red",
          "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(["red"] * 9 + ["dark red"])
          ],
        }
      ]
    },
  )
  (sample,), _ = _convert(tmp_path, "vqav2", [questions, annotations])
  assert sample["id"] == "420" and sample["answers"] == ["red"] * 9 + ["dark red"]
  assert sample["category"] == "other" and sample["question_type"] == "what color"
  assert sample["images"] == [str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")]
  test_dev = _write(
    tmp_path / "td.json",
    {"data_subtype": "test-dev2015", "questions": [{"image_id": 7, "question": "Is it?", "question_id": 70}]},
  )
  (sample,), _ = _convert(tmp_path, "vqav2", [test_dev], image_root=tmp_path / "coco")
  assert sample["answers"] == []
  assert sample["images"] == [str(tmp_path / "coco" / "test2015" / "COCO_test2015_000000000007.jpg")]
  with pytest.raises(ConversionError, match="no annotation for question_id 70"):
    convert("vqav2", [str(test_dev), str(annotations)], tmp_path / "x.jsonl")


def test_convert_textvqa_docvqa_infovqa(tmp_path):
  textvqa = _write(
    tmp_path / "TextVQA_0.5.1_val.json",
    {
      "dataset_type": "val",
      "data": [
        {
          "question": "what brand?",
          "image_id": "0054c91397f2fe05",
          "question_id": 34602,
          "answers": ["nokia"] * 10,
          "image_classes": ["Phone"],
        }
      ],
    },
  )
  (sample,), _ = _convert(tmp_path, "textvqa", [textvqa])
  assert sample["id"] == "34602" and sample["answers"] == ["nokia"] * 10
  assert sample["images"] == [str(tmp_path / "train_images" / "0054c91397f2fe05.jpg")]

  docvqa = _write(
    tmp_path / "val_v1.0.json",
    {
      "dataset_name": "docvqa",
      "data": [
        {
          "questionId": 49153,
          "question": "What is the ‘actual’ value?",
          "question_types": ["figure/diagram"],
          "image": "documents/pybv0228_81.png",
          "docId": 14465,
          "answers": ["0.28"],
        }
      ],
    },
  )
  (sample,), _ = _convert(tmp_path, "docvqa", [docvqa])
  assert sample["id"] == "49153" and sample["category"] == ["figure/diagram"]
  assert sample["images"] == [str(tmp_path / "documents" / "pybv0228_81.png")]
  assert sample["question"] == "What is the ‘actual’ value?"  # non-ASCII survives

  infovqa = _write(
    tmp_path / "infographicsVQA_val_v1.0_withQT.json",
    {
      "data": [
        {
          "questionId": 65718,
          "question": "How many?",
          "image_local_name": "20471.jpeg",
          "answers": ["5", "five"],
          "answer_type": ["single span"],
          "ocr_output_file": "20471.json",
        }
      ]
    },
  )
  (sample,), _ = _convert(tmp_path, "infovqa", [infovqa], image_root=tmp_path / "infographicsvqa_images")
  assert sample["answers"] == ["5", "five"] and sample["category"] == ["single span"]
  assert sample["images"] == [str(tmp_path / "infographicsvqa_images" / "20471.jpeg")]


def test_convert_chartqa_and_ocrbench(tmp_path):
  human = _write(
    tmp_path / "test" / "test_human.json", [{"imgname": "41699051005347.png", "query": "Max value?", "label": "62"}]
  )
  augmented = _write(
    tmp_path / "test" / "test_augmented.json", [{"imgname": "x.png", "query": "Is it red?", "label": "Yes"}]
  )
  samples, _ = _convert(tmp_path, "chartqa", [human, augmented])
  assert [(s["id"], s["category"], s["answers"]) for s in samples] == [
    ("human_0", "human", ["62"]),
    ("augmented_0", "augmented", ["Yes"]),
  ]
  assert samples[0]["images"] == [str(tmp_path / "test" / "png" / "41699051005347.png")]

  ocr = _write(
    tmp_path / "OCRBench" / "OCRBench.json",
    [
      {
        "dataset_name": "IIIT5K",
        "id": 0,
        "image_path": "IIIT5K/a.png",
        "question": "what is written in the image?",
        "answers": ["HELLO"],
        "type": "Regular Text Recognition",
      },
      {
        "dataset_name": "HME100k",
        "id": 1,
        "image_path": "HME100k/b.jpg",
        "question": "Write the expression.",
        "answers": "x ^ { 2 }",
        "type": "Handwritten Mathematical Expression Recognition",
      },
    ],
  )
  samples, _ = _convert(tmp_path, "ocrbench", [ocr], image_root=tmp_path / "OCRBench_Images")
  assert samples[1]["answers"] == ["x ^ { 2 }"] and samples[1]["dataset_name"] == "HME100k"
  assert samples[0]["images"] == [str(tmp_path / "OCRBench_Images" / "IIIT5K" / "a.png")]


def test_convert_vlmevalkit_tsv_decodes_and_shares_images(tmp_path):
  png = base64.b64encode(_png_bytes()).decode()
  header = "index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage\n"
  rows = [
    f"0\tWhich part is the leaf?\tA\tB\tC\tD\tB\tparts\t{png}\n",
    "1\tWhat eats grass?\tcow\tlion\twolf\t\tA\tfood\t0\n",
  ]  # shares row 0's image; 3 options
  tsv = _write(tmp_path / "AI2D_TEST.tsv", header + "".join(rows))
  samples, out = _convert(tmp_path, "ai2d", [tsv])
  assert samples[0]["options"] == ["A", "B", "C", "D"] and samples[0]["answers"] == ["B"]
  assert samples[1]["options"] == ["cow", "lion", "wolf"] and samples[1]["category"] == "food"
  assert samples[0]["images"] == samples[1]["images"] == [str(tmp_path / "out" / "ai2d_images" / "0.png")]
  assert Image.open(samples[0]["images"][0]).size == (2, 2)
  bad = _write(tmp_path / "bad.tsv", header + "0\tq\ta\tb\t\t\tA\tc\t5\n")
  with pytest.raises(ConversionError, match="refers to '5'"):
    convert("realworldqa", [str(bad)], tmp_path / "bad.jsonl")


MMMU_ROWS = [
  {
    "id": "validation_Art_Theory_3",
    "question": "Who painted <image 1>?",
    "options": "['Monet', 'Manet']",
    "explanation": "",
    "answer": "B",
    "question_type": "multiple-choice",
    "subfield": "Painting",
    "img_type": "['Paintings']",
    "topic_difficulty": "Easy",
  },
  {
    "id": "validation_Math_5",
    "question": "Compute <image 1> and <image 2>.",
    "options": "[]",
    "answer": "['3.5', '7/2']",
    "question_type": "open",
    "subfield": "Calculus",
  },
]


def test_convert_mmmu_parquet_rows(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rows = [
    dict(MMMU_ROWS[0], image_1={"bytes": _png_bytes(), "path": "a.png"}, image_2=None),
    dict(
      MMMU_ROWS[1],
      image_1={"bytes": _png_bytes((0, 0, 255)), "path": "b.png"},
      image_2={"bytes": _png_bytes((0, 255, 0)), "path": "c.png"},
    ),
  ]
  path = tmp_path / "validation-00000-of-00001.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  samples, _ = _convert(tmp_path, "mmmu", [path])
  first, second = samples
  assert first["options"] == ["Monet", "Manet"] and first["answers"] == ["B"]
  assert first["category"] == "Art_Theory" and first["subfield"] == "Painting"
  assert second["answers"] == ["3.5", "7/2"] and "options" not in second and len(second["images"]) == 2
  assert all(os.path.isfile(p) for s in samples for p in s["images"])


def test_convert_mmmu_json_rows_with_image_paths(tmp_path):
  rows = [dict(MMMU_ROWS[0], image_1="imgs/art3.png")]
  path = _write(tmp_path / "mmmu.jsonl", "\n".join(json.dumps(r) for r in rows))
  (sample,), _ = _convert(tmp_path, "mmmu", [path])
  assert sample["images"] == [str(tmp_path / "imgs" / "art3.png")]


def test_convert_mathvista_json_and_parquet(tmp_path):
  release = {
    "1": {
      "pid": "1",
      "question": "What is x?",
      "image": "images/1.jpg",
      "choices": None,
      "unit": None,
      "precision": 1.0,
      "answer": "1.2",
      "question_type": "free_form",
      "answer_type": "float",
      "query": "Hint: Please answer with one decimal.\nQuestion: What is x?",
      "metadata": {"task": "textbook question answering", "skills": ["scientific reasoning"]},
    },
    "2": {
      "pid": "2",
      "question": "Which is bigger?",
      "image": "images/2.jpg",
      "choices": ["3", "5"],
      "answer": "5",
      "question_type": "multi_choice",
      "answer_type": "text",
      "query": "...",
      "metadata": {"task": "figure question answering", "skills": []},
    },
  }
  path = _write(tmp_path / "testmini.json", release)
  free, choice = _convert(tmp_path, "mathvista", [path])[0]
  assert free["answers"] == ["1.2"] and free["category"] == "textbook question answering"
  assert free["images"] == [str(tmp_path / "images" / "1.jpg")] and free["skills"] == ["scientific reasoning"]
  assert choice["options"] == ["3", "5"] and choice["answers"] == ["B"] and choice["answer_text"] == "5"

  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  row = dict(release["2"], decoded_image={"bytes": _png_bytes(), "path": None})
  pq.write_table(pa.Table.from_pylist([row]), tmp_path / "testmini.parquet")
  (sample,), out = _convert(tmp_path, "mathvista", [tmp_path / "testmini.parquet"])
  assert sample["images"] == [str(tmp_path / "out" / "mathvista_images" / "mathvista_2.png")]
  bad = _write(tmp_path / "bad.json", {"3": dict(release["2"], pid="3", answer="7")})
  with pytest.raises(ConversionError, match="not one of the choices"):
    convert("mathvista", [str(bad)], tmp_path / "bad.jsonl")


def test_convert_text_benchmarks(tmp_path):
  gsm = _write(
    tmp_path / "test.jsonl",
    json.dumps({"question": "Natalia sold 48 clips...", "answer": "48/2 = <<48/2=24>>24\n#### 1,072"}) + "\n",
  )
  (sample,), _ = _convert(tmp_path, "gsm8k", [gsm])
  assert sample["answers"] == ["1072"] and sample["images"] == []

  _write(
    tmp_path / "MATH" / "test" / "algebra" / "1.json",
    {"problem": "Find x.", "level": "Level 2", "type": "Algebra", "solution": "So $x = \\boxed{\\frac{1}{2}}$."},
  )
  (sample,), _ = _convert(tmp_path, "math", [tmp_path / "MATH" / "test"])
  assert sample["id"] == "algebra/1" and sample["answers"] == ["\\frac{1}{2}"] and sample["category"] == "Algebra"

  problem = {
    "task_id": "HumanEval/0",
    "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(c):\n    assert c(1, 2) == 3\n",
    "entry_point": "add",
  }
  with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
    f.write(json.dumps(problem) + "\n")
  (sample,), _ = _convert(tmp_path, "humaneval", [tmp_path / "HumanEval.jsonl.gz"])
  assert sample["id"] == "HumanEval/0" and sample["entry_point"] == "add" and sample["test"] == problem["test"]

  _write(
    tmp_path / "data" / "test" / "abstract_algebra_test.csv",
    '"Find the degree of Q(sqrt(2)) over Q.",0,4,2,6,C\n"Is it, ""really"", true?",yes,no,maybe,never,A\n',
  )
  samples, _ = _convert(tmp_path, "mmlu", [tmp_path / "data" / "test"])
  assert [s["id"] for s in samples] == ["abstract_algebra_0", "abstract_algebra_1"]
  assert samples[1]["question"] == 'Is it, "really", true?'
  assert samples[1]["options"] == ["yes", "no", "maybe", "never"]
  assert samples[0]["answers"] == ["C"] and samples[0]["category"] == "abstract_algebra"
  _write(tmp_path / "bad_test.csv", "q,a,b,c,d,E\n")
  with pytest.raises(ConversionError, match="bad_test.csv:1: answer 'E'"):
    convert("mmlu", [str(tmp_path / "bad_test.csv")], tmp_path / "bad.jsonl")


REPO_ROOT = Path(__file__).resolve().parents[1]


def test_converter_command_line(tmp_path):
  gsm = _write(tmp_path / "test.jsonl", json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
  out = tmp_path / "gsm8k.jsonl"
  result = subprocess.run(
    [sys.executable, "-m", "nvlm_jax.evaluation.converters", "gsm8k", "--in", str(gsm), "--out", str(out)],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  assert "wrote 1 gsm8k samples" in result.stdout and load_samples(out)[0]["answers"] == ["2"]
  missing = subprocess.run(
    [
      sys.executable,
      "-m",
      "nvlm_jax.evaluation.converters",
      "gsm8k",
      "--in",
      str(tmp_path / "nope.jsonl"),
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=60,
  )
  assert missing.returncode == 1 and "does not exist" in missing.stderr
