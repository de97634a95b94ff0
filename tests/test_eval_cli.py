"""eval.py: scoring an existing predictions file, the batched generation loop, and the end-to-end check
that a tiny NVLM-D trained here (with the real trainer and data pipeline) and evaluated through eval.py
scores far above chance on a synthetic benchmark.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import reference_models as rm
import torch
from PIL import Image

from nvlm_jax import models
from nvlm_jax.evaluation import BENCHMARKS, load_samples, read_predictions, write_samples
from nvlm_jax.evaluation import generate_answers as ga
from nvlm_jax.generation import generate
from nvlm_jax.processing.tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _load_eval_module():
  spec = importlib.util.spec_from_file_location("nvlm_eval_cli", ROOT / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


eval_cli = _load_eval_module()


# --- scoring only --------------------------------------------------------------------------------------


@pytest.fixture()
def vqa_files(tmp_path):
  samples = [
    {"id": "q1", "images": [], "question": "What color is the bus?", "answers": ["red"] * 10, "category": "color"},
    {"id": "q2", "images": [], "question": "How many dogs?", "answers": ["2"] * 7 + ["two"] * 3, "category": "number"},
    {"id": "q3", "images": [], "question": "Is it raining?", "answers": ["yes"] * 2 + ["no"] * 8, "category": "yes/no"},
  ]
  data = tmp_path / "data.jsonl"
  write_samples(data, samples)
  predictions = tmp_path / "predictions.jsonl"
  rows = [{"id": "q1", "prediction": "Red."}, {"id": "q2", "prediction": "two"}, {"id": "q3", "prediction": "yes"}]
  predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return data, predictions


def test_scoring_only_mode_scores_a_predictions_file(vqa_files, tmp_path, capsys):
  data, predictions = vqa_files
  out = tmp_path / "out"
  assert (
    eval_cli.main(["--predictions", str(predictions), "--benchmark", "vqav2", "--data", str(data), "--out", str(out)])
    == 0
  )
  summary = json.loads((out / "summary.json").read_text())
  # Official VQA accuracy: unanimous "red" answers are not normalized, so "Red." scores 0; "two" -> "2"
  # matches 9 of every 9 others -> 1; "yes": 2 subsets with 1 match (1/3), 8 with 2 (2/3) -> 0.6.
  assert summary["score"] == pytest.approx(100 * (0 + 1 + 0.6) / 3)
  assert summary["per_category"] == pytest.approx({"color": 0.0, "number": 100.0, "yes/no": 60.0})
  assert json.loads(capsys.readouterr().out) == summary
  args = ["--predictions", str(predictions), "--benchmark", "vqav2", "--data", str(data), "--out", str(tmp_path / "m")]
  assert eval_cli.main([*args, "--option", "scorer=megatron"]) == 0
  # Megatron: "red" matches 10/3 -> 1; "two" -> "2" matches all 10 -> 1; "yes" matches 2 -> 2/3.
  megatron = json.loads((tmp_path / "m" / "summary.json").read_text())
  assert megatron["score"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)
  assert summary["num_samples"] == 3 and summary["num_missing"] == 0


def test_help_lists_every_benchmark_and_its_options(capsys):
  with pytest.raises(SystemExit):
    eval_cli.main(["--help"])
  text = capsys.readouterr().out
  for name, benchmark in BENCHMARKS.items():
    line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
    assert all(option in line for option in benchmark.option_names()), line
  assert "scorer=megatron" in text


def test_scoring_only_mode_runs_without_jax(vqa_files):
  data, predictions = vqa_files
  script = (
    "import runpy, sys; sys.argv = sys.argv[1:]; "
    "code = 0\ntry:\n  runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n  code = e.code\n"
    "assert 'jax' not in sys.modules, 'scoring imported jax'\nsys.exit(code)"
  )
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      script,
      str(ROOT / "eval.py"),
      "--predictions",
      str(predictions),
      "--benchmark",
      "vqav2",
      "--data",
      str(data),
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["score"] == pytest.approx(100 * (0 + 1 + 0.6) / 3)


def test_scoring_only_mode_names_the_missing_sample(vqa_files, tmp_path):
  data, predictions = vqa_files
  partial = tmp_path / "partial.jsonl"
  partial.write_text(predictions.read_text().splitlines()[0] + "\n")
  with pytest.raises(ValueError, match="q2"):
    eval_cli.main(["--predictions", str(partial), "--benchmark", "vqav2", "--data", str(data)])
  assert (
    eval_cli.main(["--predictions", str(partial), "--benchmark", "vqav2", "--data", str(data), "--allow-missing"]) == 0
  )


# --- the pieces of the generation loop ------------------------------------------------------------------


def test_answers_are_cut_at_the_first_stop_token_and_stripped():
  tokenizer = build_tiny_tokenizer()
  ids = tokenizer.encode(" The bus is red. ")
  eos, start = tokenizer.eos_id, tokenizer.token_to_id("<|im_start|>")
  answer = ga.decode_answer(ids + [eos] + tokenizer.encode("junk"), tokenizer, [eos])
  assert answer == ga.Answer("The bus is red.", len(ids), True)
  answer = ga.decode_answer([start] + ids, tokenizer, [eos])  # special tokens dropped; no EOS: unfinished
  assert answer == ga.Answer("The bus is red.", len(ids) + 1, False)


def test_batches_sort_longest_first_and_cover_every_sample_once():
  lengths = [5, 9, 9, 1, 7]
  order = ga.sort_by_length(lengths)
  assert order == [1, 2, 4, 0, 3]
  assert ga.batches_of(order, 2) == [[1, 2], [4, 0], [3]]


def test_prompts_use_the_benchmark_system_prompt_and_suffix():
  tokenizer = build_tiny_tokenizer()
  from nvlm_jax.processing.processor import Processor

  processor = Processor(tokenizer)
  sample = {"id": "x", "images": [], "question": "What is 2 + 2?", "answers": ["4"]}
  encoded = ga.encode_prompt(processor, BENCHMARKS["gsm8k"], sample)
  assert encoded.text == (
    "<|im_start|>system\nFollow the user's instruction and answer questions.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 2?\nPlease reason step by step, and put your final answer "
    "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
  )
  missing = {**sample, "images": ["/nonexistent/x.png"]}
  with pytest.raises(ga.PromptError, match="vqav2 sample 'x'.*x.png"):
    ga.encode_prompt(processor, BENCHMARKS["vqav2"], missing)


# --- generation with a tiny HF text model --------------------------------------------------------------


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
  """A tiny random transformers Qwen2 + our tiny tokenizer: a HF checkpoint dir as eval.py gets it."""
  directory = tmp_path_factory.mktemp("qwen2_eval")
  tokenizer = build_tiny_tokenizer(vocab_size=384, out_dir=directory)
  config = rm.tiny_qwen2_config(
    vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, num_hidden_layers=2
  )
  model = rm.build_causal_lm(config, seed=5)
  with torch.no_grad():  # EOS logit 0 never wins: every answer runs to max_new_tokens (the batches differ)
    model.lm_head.weight[tokenizer.eos_id] = 0.0
  rm.save(model, directory)
  return directory


def _text_samples(n: int) -> list[dict]:
  words = "the quick brown fox jumps over the lazy dog and sits on a mat".split()
  return [
    {"id": f"s{i}", "images": [], "question": " ".join(words[: 2 + (i * 5) % 13]) + "?", "answers": [str(i)]}
    for i in range(n)
  ]


def test_eval_batches_in_any_order_give_each_sample_its_own_greedy_answer(text_checkpoint, tmp_path):
  data = tmp_path / "gsm8k.jsonl"
  write_samples(data, _text_samples(7))
  out = tmp_path / "out"
  assert (
    eval_cli.main(
      [
        "--checkpoint",
        str(text_checkpoint),
        "--benchmark",
        "gsm8k",
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "6",
        "--limit",
        "5",
        "--no-progress",
      ]
    )
    == 0
  )
  rows = read_predictions(out / "predictions.jsonl")
  assert [r["id"] for r in rows] == ["s0", "s1", "s2", "s3", "s4"]  # file order, though generated longest first
  summary = json.loads((out / "summary.json").read_text())
  assert summary["num_samples"] == 5 and summary["score"] == 0.0 and summary["max_new_tokens"] == 6
  assert summary["num_unfinished"] == 5 and summary["checkpoint"] == str(text_checkpoint)

  # Each answer is what the sample generates alone (a batch of one).
  model, params = models.load_model(text_checkpoint)
  processor = ga.load_processor(text_checkpoint, model)
  samples = load_samples(data)
  for row, sample in zip(rows, samples):
    encoded = ga.encode_prompt(processor, BENCHMARKS["gsm8k"], sample)
    assert row["num_prompt_tokens"] == len(encoded.input_ids)
    tokens = np.asarray(
      generate(
        model,
        params,
        encoded.input_ids[None],
        max_new_tokens=6,
        pad_to_multiple_of=64,
        eos_token_id=ga.eos_ids(model, processor),
      )
    )[0]
    assert row["prediction"] == ga.decode_answer(tokens, processor.tokenizer, ga.eos_ids(model, processor)).text
    assert row["prediction"] and row["num_generated_tokens"] == 6 and not row["finished"]


def test_unlabelled_samples_are_generated_but_not_scored(text_checkpoint, tmp_path):
  data = tmp_path / "test.jsonl"
  write_samples(data, [{k: v for k, v in s.items() if k != "answers"} for s in _text_samples(3)])
  assert (
    eval_cli.main(
      [
        "--checkpoint",
        str(text_checkpoint),
        "--benchmark",
        "gsm8k",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "6",
        "--no-progress",
      ]
    )
    == 0
  )
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["score"] is None and "unlabelled" in summary["note"]
  assert len(read_predictions(tmp_path / "out" / "predictions.jsonl")) == 3


def test_sharded_eval_gives_the_same_answers(text_checkpoint, tmp_path):
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py)")
  data = tmp_path / "gsm8k.jsonl"
  write_samples(data, _text_samples(4))
  answers = {}
  for name, mesh in (("single", []), ("sharded", ["--mesh", "fsdp=1,tensor=2"])):
    assert (
      eval_cli.main(
        [
          "--checkpoint",
          str(text_checkpoint),
          "--benchmark",
          "gsm8k",
          "--data",
          str(data),
          "--out",
          str(tmp_path / name),
          "--batch-size",
          "3",
          "--max-new-tokens",
          "6",
          "--no-progress",
          *mesh,
        ]
      )
      == 0
    )
    answers[name] = [r["prediction"] for r in read_predictions(tmp_path / name / "predictions.jsonl")]
  assert answers["sharded"] == answers["single"]


def test_a_text_only_model_refuses_image_prompts(text_checkpoint, tmp_path):
  Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
  data = tmp_path / "vqa.jsonl"
  write_samples(data, [{"id": "img1", "images": ["red.png"], "question": "Color?", "answers": ["red"]}])
  with pytest.raises(ValueError, match="text-only.*img1"):
    eval_cli.main(
      [
        "--checkpoint",
        str(text_checkpoint),
        "--benchmark",
        "vqav2",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
      ]
    )


# --- end to end: train a tiny NVLM-D, evaluate it with eval.py -----------------------------------------


def color_benchmark(root: Path, split: str, num: int, seed: int) -> list[dict]:
  """Scenes of the synthetic set (its renderer, palette and colour question) holding one shape each.

  The answer is the colour of the shape, uniform over the 6 palette colours, so chance is 1/6; the
  shape kind in the question is irrelevant to the answer. Images are 56 px: one 56 px tile each.
  """
  from nvlm_jax.data import synthetic

  rng = np.random.default_rng(seed)
  (root / split).mkdir(parents=True, exist_ok=True)
  samples = []
  for i in range(num):
    kind = synthetic.SHAPES[int(rng.integers(len(synthetic.SHAPES)))]
    color = list(synthetic.COLORS)[int(rng.integers(len(synthetic.COLORS)))]
    side = int(rng.integers(24, 44))
    x0, y0 = (int(v) for v in rng.integers(2, 56 - side - 2, size=2))
    background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    shape = synthetic.Shape(kind, color, (x0, y0, x0 + side - 1, y0 + side - 1), 0)
    scene = synthetic.Scene(56, 56, (1, 1), background, (shape,), None, None)
    (root / split / f"{i}.png").write_bytes(synthetic.encode_png(synthetic.render(scene)))
    samples.append(
      {
        "id": f"{split}-{i}",
        "images": [f"{split}/{i}.png"],
        "question": synthetic.Q_COLOR.format(shape=kind),
        "answers": [color] * 10,
        "category": kind,
      }
    )
  return samples


def write_llava_training_file(path: Path, samples: list[dict], benchmark) -> None:
  """The training conversations use exactly the prompt eval.py will use (system prompt + suffix)."""
  with open(path, "w") as f:
    for s in samples:
      system, user = benchmark.build_prompt(s)
      f.write(
        json.dumps(
          {
            "id": s["id"],
            "images": s["images"],
            "system": system,
            "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": s["answers"][0]}],
          }
        )
        + "\n"
      )


@pytest.mark.slow
def test_tiny_nvlm_d_trained_here_scores_far_above_chance_through_eval_py(tmp_path):
  from nvlm_jax.data import synthetic
  from nvlm_jax.training import config_base, trainer

  bench = BENCHMARKS["vqav2"]
  train = color_benchmark(tmp_path, "train", 300, seed=1)
  evals = color_benchmark(tmp_path, "eval", 120, seed=2)
  write_llava_training_file(tmp_path / "train.jsonl", train, bench)
  write_samples(tmp_path / "eval.jsonl", evals)

  # A tiny BPE that knows the prompts; the trainer builds the processor from it (data.tokenizer) and saves
  # both into the workdir, where eval.py finds them.
  corpus = synthetic.corpus_texts(50) + [bench.system_prompt, bench.answer_suffix] * 5
  tokenizer = build_tiny_tokenizer(corpus, vocab_size=1024, out_dir=tmp_path / "tokenizer")

  workdir = tmp_path / "workdir"
  c = config_base.base_config()
  c.workdir = str(workdir)
  c.seed = 0
  c.total_steps = 120
  c.model.preset = "tiny_nvlm_d"
  c.model.dtype = "float32"
  c.model.overrides = {
    "llm": {
      "vocab_size": tokenizer.vocab_size,
      "eos_token_id": tokenizer.eos_id,
      "pad_token_id": tokenizer.pad_id,
      "bos_token_id": None,
    },
    "max_tiles": 1,
    "freeze_vision": False,
  }
  c.optimizer.update(lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.01, grad_clip=1.0)
  c.data.update(
    kind="nvlm_pipeline",
    global_batch_size=16,
    seq_len=72,
    max_tiles=1,
    read_threads=1,
    tokenizer=str(tmp_path / "tokenizer"),
    sources=[{"kind": "llava", "path": str(tmp_path / "train.jsonl"), "weight": 1.0}],
  )
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.checkpoint.update(every_steps=c.total_steps, async_save=False)
  c.log.update(every_steps=20, tensorboard=False)
  history = trainer.Trainer(c, devices=jax.devices()[:1]).run()
  assert history[-1]["loss"] < 0.5 * history[0]["loss"], [h["loss"] for h in history]

  out = tmp_path / "eval_out"
  assert (
    eval_cli.main(
      [
        "--checkpoint",
        str(workdir),
        "--benchmark",
        "vqav2",
        "--data",
        str(tmp_path / "eval.jsonl"),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--max-new-tokens",
        "4",
        "--no-progress",
      ]
    )
    == 0
  )
  summary = json.loads((out / "summary.json").read_text())
  counts = collections.Counter(s["answers"][0] for s in evals)
  chance = 100 / len(synthetic.COLORS)
  majority = 100 * max(counts.values()) / len(evals)  # always answering the commonest colour
  print(
    f"\ntiny NVLM-D, {c.total_steps} steps: vqav2 accuracy {summary['score']:.1f} on {len(evals)} held-out "
    f"scenes; chance {chance:.1f}, majority answer {majority:.1f}"
  )
  assert summary["num_samples"] == len(evals)
  assert summary["score"] > max(chance, majority) + 30
  rows = read_predictions(out / "predictions.jsonl")
  assert [r["id"] for r in rows] == [s["id"] for s in evals]
  assert all(r["prediction"] in synthetic.COLORS for r in rows)

  # The chat command, on the same checkpoint and image, gives the same answer.
  from nvlm_jax import chat

  sample = evals[0]
  system, user = bench.build_prompt(sample)
  printed = io.StringIO()
  chat.main(
    [
      "--checkpoint",
      str(workdir),
      "--image",
      str(tmp_path / sample["images"][0]),
      "--system",
      system,
      "--prompt",
      user,
      "--max-new-tokens",
      "4",
    ],
    out=printed,
  )
  assert printed.getvalue() == rows[0]["prediction"] + "\n"
