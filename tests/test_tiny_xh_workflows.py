"""NVLM-X and NVLM-H through the user's workflow: train (configs/tiny_x.py, tiny_h.py and a paper recipe's
`:runlocal` variant, on the data pipeline),
then chat (NVLM-X) and eval.py (NVLM-H) on the trained workdir with --dtype bfloat16 and --tokenizer.

Training runs a few steps only (the loss must fall); the checkpoint is shared by the chat and eval tests of the
same variant. Chat and eval answers are compared with greedy `generate` on each prompt alone, from the model
loaded independently in the same dtype.
"""

import importlib.util
import io
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from nvlm_jax import chat, models
from nvlm_jax.evaluation import BENCHMARKS, load_samples, read_predictions, write_samples
from nvlm_jax.evaluation import generate_answers as ga
from nvlm_jax.generation import generate
from nvlm_jax.training import trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def load_config(name: str):
  """configs/NAME.py, or configs/RECIPE.py:ARG for 'RECIPE:ARG' (a paper recipe's `runlocal` variant)."""
  file, _, arg = name.partition(":")
  spec = importlib.util.spec_from_file_location(file, ROOT / "configs" / f"{file}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


@pytest.fixture(scope="module", params=["tiny_x", "tiny_h", "nvlm_h_72b_sft:runlocal"])
def trained(request, tmp_path_factory):
  """(variant, workdir, losses) of a tiny X/H config trained STEPS steps at a small batch."""
  c = load_config(request.param)
  workdir = tmp_path_factory.mktemp(request.param.replace(":", "_"))
  c.update(workdir=str(workdir), total_steps=STEPS, compiler_options={"xla_backend_optimization_level": 0})
  c.data.update(global_batch_size=4, seq_len=160, max_tiles=3, read_threads=1, batch_prefetch=1)
  c.optimizer.update(lr=3e-3, warmup_steps=1)
  c.log.update(every_steps=1, tensorboard=False)
  history = trainer.Trainer(c, devices=jax.devices()[:1]).run()
  return c.model.preset[-1], workdir, [h["loss"] for h in history]


def test_tiny_config_trains_and_the_loss_falls(trained):
  variant, workdir, losses = trained
  assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
  assert losses[0] > 5.0  # ~log(512) at init
  assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
  model, _ = models.load_model(workdir)
  assert type(model).__name__ == f"NVLM{variant.upper()}"


@pytest.fixture()
def tokenizer_elsewhere(trained, tmp_path):
  """The run's tokenizer.json copied to its own directory (what --tokenizer points at)."""
  _, workdir, _ = trained
  found = sorted(workdir.rglob("tokenizer.json"))
  assert found, f"no tokenizer.json in {workdir}"
  directory = tmp_path / "tokenizer"
  directory.mkdir()
  shutil.copy(found[0], directory / "tokenizer.json")
  return directory


@pytest.fixture()
def loaded_models(monkeypatch):
  """Every (model, params) the commands load through nvlm_jax.models.load_model, in order."""
  loaded, load_model = [], models.load_model
  monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1])
  return loaded


def assert_all_bf16(params):
  assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"bfloat16"}


def write_image(path: Path, seed: int) -> Path:
  pixels = np.random.default_rng(seed).integers(0, 255, (60, 90, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return path


def greedy_alone(model, params, processor, input_ids, pixel_values, tile_mask, max_new_tokens, stop_ids):
  tokens = np.asarray(
    generate(
      model,
      params,
      input_ids,
      pixel_values=pixel_values,
      tile_mask=tile_mask,
      max_new_tokens=max_new_tokens,
      eos_token_id=stop_ids,
    )
  )[0]
  return ga.decode_answer(tokens, processor.tokenizer, stop_ids)


@pytest.mark.parametrize("trained", ["tiny_x"], indirect=True)  # X here, H in the eval test: each path once
def test_chat_with_an_image_in_bf16_prints_generates_answer(trained, tokenizer_elsewhere, tmp_path, loaded_models):
  _, workdir, _ = trained
  image = write_image(tmp_path / "photo.png", seed=1)
  out = io.StringIO()
  args = [
    "--checkpoint",
    str(workdir),
    "--image",
    str(image),
    "--prompt",
    "What color is the circle?",
    "--max-new-tokens",
    "5",
    "--dtype",
    "bfloat16",
    "--tokenizer",
    str(tokenizer_elsewhere),
  ]
  assert chat.main(args, out=out) == 0
  assert_all_bf16(loaded_models[0][1])

  model, params = loaded_models[0]
  processor = ga.load_processor(workdir, model, tokenizer=tokenizer_elsewhere)
  batch = processor(
    [{"role": "user", "content": "<image>\nWhat color is the circle?"}], [Image.open(image)], add_generation_prompt=True
  )
  eos = processor.tokenizer.eos_id
  tokens = np.asarray(
    generate(
      model,
      params,
      batch["input_ids"],
      attention_mask=batch["attention_mask"],
      pixel_values=batch["pixel_values"],
      tile_mask=batch["tile_mask"],
      max_new_tokens=5,
      eos_token_id=eos,
    )
  )[0].tolist()
  tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
  assert out.getvalue() == processor.tokenizer.decode(tokens, skip_special_tokens=True) + "\n"

  empty = tmp_path / "no_tokenizer"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
    chat.main(args[:-1] + [str(empty)], out=io.StringIO())


def _load_eval_module():
  spec = importlib.util.spec_from_file_location("nvlm_eval_cli_xh", ROOT / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("trained", ["tiny_h"], indirect=True)
def test_eval_py_answers_each_image_question_as_generate_does(trained, tokenizer_elsewhere, tmp_path, loaded_models):
  _, workdir, _ = trained
  samples = [
    {"id": f"v{i}", "images": [f"{i}.png"], "question": q, "answers": ["red"] * 10}
    for i, q in enumerate(["What color is the square?", "Which shape is the largest one here?"])
  ]
  for i in range(len(samples)):
    write_image(tmp_path / f"{i}.png", seed=10 + i)
  data = tmp_path / "vqav2.jsonl"
  write_samples(data, samples)
  out = tmp_path / "out"
  args = [
    "--checkpoint",
    str(workdir),
    "--benchmark",
    "vqav2",
    "--data",
    str(data),
    "--out",
    str(out),
    "--batch-size",
    "2",
    "--max-new-tokens",
    "3",
    "--dtype",
    "bfloat16",
    "--tokenizer",
    str(tokenizer_elsewhere),
    "--no-progress",
  ]
  eval_cli = _load_eval_module()
  assert eval_cli.main(args) == 0
  assert_all_bf16(loaded_models[0][1])
  summary = json.loads((out / "summary.json").read_text())
  assert summary["num_samples"] == 2 and summary["dtype"] == "bfloat16"
  rows = read_predictions(out / "predictions.jsonl")

  model, params = loaded_models[0]
  processor = ga.load_processor(workdir, model, tokenizer=tokenizer_elsewhere)
  stop_ids = ga.eos_ids(model, processor)
  for row, sample in zip(rows, load_samples(data)):
    encoded = ga.encode_prompt(processor, BENCHMARKS["vqav2"], sample)
    arrays = processor.collate([encoded], padding_side="left")
    answer = greedy_alone(
      model, params, processor, arrays["input_ids"], arrays["pixel_values"], arrays["tile_mask"], 3, stop_ids
    )
    assert row["id"] == sample["id"] and row["prediction"] == answer.text

  empty = tmp_path / "no_tokenizer"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
    eval_cli.main(args[:-2] + [str(empty), "--no-progress"])


@pytest.mark.parametrize("trained", ["tiny_x", "tiny_h"], indirect=True)
def test_synthetic_benchmark_asks_x_and_h_every_held_out_question(trained, tmp_path):
  from nvlm_jax.data.synthetic import SyntheticSource
  from nvlm_jax.evaluation import synthetic

  variant, workdir, _ = trained
  summary = synthetic.evaluate_checkpoint(workdir, num_samples=3, batch_size=8, out=tmp_path, pad_to_multiple_of=256)
  assert summary["model"] == f"NVLM{variant.upper()}" and summary["seed_check"] == "verified"
  expected = SyntheticSource(3, synthetic.HELD_OUT_SEED, size="tiny", tile_size=56, max_tiles=6)
  types = [kind for i in range(3) for kind in expected.plan(i).types]
  rows = read_predictions(tmp_path / "predictions.jsonl")
  assert [r["type"] for r in rows] == types and summary["num_questions"] == len(types)
  assert all(r["correct"] == (r["finished"] and r["prediction"] == r["answer"]) for r in rows)
