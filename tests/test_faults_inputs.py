"""Faults in input files and arguments: each gives an error naming what is wrong (file, line, key, id).

Conversion: a tensor whose dtype kind cannot hold a weight (int32 / bool where a float belongs) is refused
by `convert import` and `convert verify`, naming the key and the shard file. Then the messages for
non-UTF8 LLaVA and predictions files, `load_processor` on a missing directory, `max_length <= 0` and
out-of-vocabulary ids in `decode`.
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from nvlm_jax import convert
from nvlm_jax.checkpoint import safetensors_io as sio
from nvlm_jax.checkpoint.convert.output import ConvertError
from nvlm_jax.checkpoint.convert.verify import verify
from nvlm_jax.data.llava import LlavaFormatError, LlavaSource
from nvlm_jax.evaluation.predictions import PredictionsError, read_predictions
from nvlm_jax.processing.processor import Processor
from nvlm_jax.processing.tokenizer import NvlmTokenizer, build_tiny_tokenizer
from nvlm_jax.data.processor_setup import read_run_processor as load_processor

BAD_KEY = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  """A tiny Qwen2 HF directory and our float32 import of it."""
  rm = pytest.importorskip("reference_models")
  root = tmp_path_factory.mktemp("qwen2")
  hf_dir = rm.save(rm.build_causal_lm(rm.tiny_qwen2_config(), seed=0), root / "hf")
  assert convert.main(["import", "--hf-dir", str(hf_dir), "--out", str(root / "ours"), "--quiet"]) == 0
  return hf_dir, root / "ours"


def with_tensor_as(source: Path, dest: Path, dtype) -> Path:
  """A copy of `source` whose BAD_KEY tensor is stored as `dtype` (values cast), in two shards."""
  ckpt = sio.open_checkpoint(source)
  tensors = {k: np.asarray(ckpt.read(k)) for k in ckpt}
  tensors[BAD_KEY] = tensors[BAD_KEY].astype(dtype)
  dest.mkdir()
  sio.save_sharded(sorted(tensors.items()), dest, max_shard_bytes=300_000)
  shutil.copy(source / "config.json", dest / "config.json")
  return dest


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_import_refuses_a_non_float_tensor_naming_key_and_file(qwen2, tmp_path, capsys, dtype):
  source = with_tensor_as(qwen2[0], tmp_path / "source", dtype)
  assert convert.main(["import", "--hf-dir", str(source), "--out", str(tmp_path / "out"), "--quiet"]) == 1
  err = capsys.readouterr().err
  assert re.search(
    rf"source/model-0000\d-of-\d+\.safetensors: tensor '{re.escape(BAD_KEY)}' is {dtype}, but it "
    r"feeds a floating-point parameter",
    err,
  ), err
  assert not (tmp_path / "out").exists()


def test_verify_checks_dtypes_as_well_as_values(qwen2, tmp_path):
  hf_dir, ours = qwen2
  report = verify(hf_dir, ours, use_transformers=False)
  assert report["ok"] and set(report["param_dtypes"]) == {"float32"}
  assert report["dtype_mismatches"] == {"count": 0, "examples": []}
  bf16 = tmp_path / "bf16"
  assert convert.main(["import", "--hf-dir", str(hf_dir), "--out", str(bf16), "--dtype", "bfloat16", "--quiet"]) == 0
  report = verify(hf_dir, bf16, use_transformers=False)
  assert report["param_dtypes"] == {"bfloat16": report["dtype_mismatches"]["count"]}
  assert report["dtype_mismatches"]["examples"][0].endswith(": stored bfloat16, files float32")
  source = with_tensor_as(hf_dir, tmp_path / "source", "int32")
  with pytest.raises(ConvertError, match=rf"tensor '{re.escape(BAD_KEY)}' is int32"):
    verify(source, ours, use_transformers=False)


def test_non_utf8_llava_json_names_file_and_line(tmp_path):
  path = tmp_path / "data.json"
  path.write_bytes(b'[\n{"id": "a",\n "conversations": "\xff\xfe"}\n]\n')
  with pytest.raises(LlavaFormatError, match=rf"{re.escape(str(path))}:3: not UTF-8 text"):
    LlavaSource(path)


def test_non_utf8_predictions_name_file_and_line(tmp_path):
  path = tmp_path / "predictions.jsonl"
  path.write_bytes(b'{"id": "a", "prediction": "yes"}\n{"id": "b", "prediction": "\xe9t\xe9"}\n')
  with pytest.raises(PredictionsError, match=rf"{re.escape(str(path))}:2: not UTF-8 text"):
    read_predictions(path)


def test_load_processor_on_a_missing_directory_names_it(tmp_path):
  missing = tmp_path / "no_run_here"
  with pytest.raises(
    FileNotFoundError,
    match=rf"load_processor\({re.escape(str(missing))}\): the directory does "
    r"not exist.*Processor\.from_pretrained",
  ):
    load_processor(missing)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"has no processor\.json"):
    load_processor(tmp_path / "empty")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  build_tiny_tokenizer(None, vocab_size=420, out_dir=out)
  return Processor(NvlmTokenizer.from_pretrained(out), image_size=56, patch_size=14, downsample_ratio=0.5)


@pytest.mark.parametrize("max_length", [0, -1])
def test_max_length_must_be_positive(processor, max_length):
  messages = [{"role": "user", "content": "hello"}]
  with pytest.raises(ValueError, match=rf"max_length={max_length}: must be a positive number of tokens"):
    processor(messages, max_length=max_length)


def test_decode_names_an_id_outside_the_vocabulary(processor):
  ids = processor([{"role": "user", "content": "hello"}])["input_ids"][0]
  assert "hello" in processor.decode(ids)
  size = processor.tokenizer.backend.get_vocab_size(with_added_tokens=True)
  with pytest.raises(
    ValueError,
    match=rf"token id\(s\) \[{size}, {size + 7}\] are outside the tokenizer's "
    rf"vocabulary \(ids 0\.\.{size - 1}\)",
  ):
    processor.decode(np.concatenate([ids, [size + 7, size]]))


def test_generated_answers_read_an_id_outside_the_vocabulary_as_a_replacement(processor):
  """Eval (and chat) decode what a model generated: an id of a padded embedding row must not end the run."""
  from nvlm_jax.evaluation.generate_answers import decode_answer

  tokenizer = processor.tokenizer
  size = tokenizer.backend.get_vocab_size(with_added_tokens=True)
  hello, world = tokenizer.encode("hello"), tokenizer.encode(" world")
  ids = [*hello, size + 3, *world]
  assert tokenizer.decode(ids, unknown="?") == "hello? world"
  answer = decode_answer([*ids, tokenizer.eos_id, size], tokenizer, stop_ids=[tokenizer.eos_id])
  assert answer.text == "hello\ufffd world" and answer.finished and answer.num_generated_tokens == len(ids)
