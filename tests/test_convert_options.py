"""Each documented `python -m nvlm_jax.convert` option does what docs/checkpoints.md says (beyond the round trips
of tests/test_convert.py): import --layout / --compression / --memory-budget, export --step / --dtype,
inspect --all, verify --atol / --seed / --tiles / --no-transformers, stitch --image-token-id / --dtype / --seed / --xattn-offset.

Each test compares against something computed independently of the option's code path: the tensors of the source
files, a perturbed copy of them, a checkpoint's own step, or the same command without the option.
"""

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import reference_models as rm
from test_convert import hf_tensors, stored_params
from test_vision import build_torch_vit

from nvlm_jax import convert, models
from nvlm_jax.checkpoint import orbax_stream
from nvlm_jax.checkpoint import safetensors_io as sio


def run_cli(*args) -> int:
  return convert.main([str(a) for a in args])


def disk_bytes(directory: Path) -> int:
  return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """A tiny Qwen2 and a tiny InternViT as HF directories, and our import of the Qwen2."""
  root = tmp_path_factory.mktemp("sources")
  qwen2 = rm.save(rm.build_causal_lm(rm.tiny_qwen2_config(), seed=0), root / "qwen2")
  vit = rm.save(build_torch_vit("6b", seed=3), root / "vit", max_shard_size="20KB")
  assert run_cli("import", "--hf-dir", qwen2, "--out", root / "imported", "--quiet") == 0
  return {"qwen2": qwen2, "vit": vit, "imported": root / "imported"}


# --- import ------------------------------------------------------------------------------------------


def test_import_layout_names_the_layout_and_a_wrong_one_is_refused(sources, tmp_path, capsys):
  assert run_cli("import", "--hf-dir", sources["vit"], "--out", tmp_path / "auto", "--quiet") == 0
  assert (
    run_cli("import", "--hf-dir", sources["vit"], "--out", tmp_path / "named", "--layout", "internvl_vision", "--quiet")
    == 0
  )
  auto, named = stored_params(tmp_path / "auto"), stored_params(tmp_path / "named")
  assert set(auto) == set(named) and all(auto[k].tobytes() == named[k].tobytes() for k in auto)
  capsys.readouterr()
  assert run_cli("import", "--hf-dir", sources["vit"], "--out", tmp_path / "wrong", "--layout", "qwen2", "--quiet") == 1
  assert "qwen2" in capsys.readouterr().err.lower() and not (tmp_path / "wrong").exists()


def test_import_compression_none_stores_the_same_values_uncompressed(sources, tmp_path):
  assert (
    run_cli("import", "--hf-dir", sources["qwen2"], "--out", tmp_path / "raw", "--compression", "none", "--quiet") == 0
  )
  zstd, raw = stored_params(sources["imported"]), stored_params(tmp_path / "raw")
  assert all(zstd[k].tobytes() == raw[k].tobytes() for k in zstd)
  # zstd (level 1) squeezes the repeated exponent bytes of small random fp32 weights
  assert disk_bytes(tmp_path / "raw") > 1.05 * disk_bytes(sources["imported"])


def test_import_memory_budget_bounds_the_bytes_in_flight(sources, tmp_path, monkeypatch, capsys):
  seen = []
  original = orbax_stream.ParamWriter.__init__

  def spy(self, *args, **kwargs):
    original(self, *args, **kwargs)
    seen.append(self.inflight_bytes)

  monkeypatch.setattr(orbax_stream.ParamWriter, "__init__", spy)
  assert (
    run_cli("import", "--hf-dir", sources["qwen2"], "--out", tmp_path / "small", "--memory-budget", "3KiB", "--quiet")
    == 0
  )
  assert seen == [3 * 1024]
  small = stored_params(tmp_path / "small")
  reference = stored_params(sources["imported"])
  assert all(small[k].tobytes() == reference[k].tobytes() for k in reference)
  capsys.readouterr()
  assert (
    run_cli("import", "--hf-dir", sources["qwen2"], "--out", tmp_path / "bad", "--memory-budget", "lots", "--quiet")
    == 1
  )
  assert "'lots'" in capsys.readouterr().err


# --- export --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A trainer workdir of the tiny LM (Qwen2 layout) with checkpoints at steps 1 and 2."""
  from test_training import lm_batches, lm_config

  from nvlm_jax.training import trainer

  workdir = tmp_path_factory.mktemp("two_steps")
  config = lm_config(total_steps=2, workdir=str(workdir))
  config.checkpoint.update(every_steps=1, max_to_keep=5)
  config.log.update(every_steps=1, tensorboard=False)
  trainer.Trainer(config, devices=jax.devices()[:1], data_iterator=lm_batches()).run()
  return workdir


def test_export_step_writes_that_step_and_dtype_casts(two_steps, tmp_path):
  from flax import traverse_util

  first = traverse_util.flatten_dict(jax.device_get(models.load_checkpoint(two_steps, step=1)[1]), sep="/")
  kernel = first["lm_head/kernel"]  # [hidden, vocab]: the HF weight is its transpose
  assert (
    run_cli(
      "export", "--checkpoint", two_steps, "--out", tmp_path / "step1", "--layout", "qwen2", "--step", "1", "--quiet"
    )
    == 0
  )
  assert run_cli("export", "--checkpoint", two_steps, "--out", tmp_path / "latest", "--layout", "qwen2", "--quiet") == 0
  assert (
    run_cli(
      "export",
      "--checkpoint",
      two_steps,
      "--out",
      tmp_path / "bf16",
      "--layout",
      "qwen2",
      "--step",
      "1",
      "--dtype",
      "bfloat16",
      "--quiet",
    )
    == 0
  )
  step1, latest = hf_tensors(tmp_path / "step1"), hf_tensors(tmp_path / "latest")
  bf16 = hf_tensors(tmp_path / "bf16")
  np.testing.assert_array_equal(step1["lm_head.weight"], kernel.T)
  assert not np.array_equal(latest["lm_head.weight"], kernel.T)  # step 2 trained on
  assert step1["lm_head.weight"].dtype == np.float32 and {a.dtype for a in bf16.values()} == {
    np.dtype(ml_dtypes.bfloat16)
  }
  np.testing.assert_array_equal(bf16["lm_head.weight"], kernel.T.astype(ml_dtypes.bfloat16))


# --- inspect -------------------------------------------------------------------------------------------


def test_inspect_all_lists_every_layer_instead_of_folding(sources, capsys):
  assert run_cli("inspect", sources["qwen2"]) == 0
  folded = capsys.readouterr().out
  assert run_cli("inspect", sources["qwen2"], "--all") == 0
  listed = capsys.readouterr().out
  layers = rm.TINY_TEXT["num_hidden_layers"]
  assert "model.layers.{layer}.mlp.up_proj.weight" in folded and "model.layers.1.mlp.up_proj.weight" not in folded
  for i in range(layers):
    assert f"model.layers.{i}.mlp.up_proj.weight" in listed


# --- verify --------------------------------------------------------------------------------------------


def perturbed_copy(source: Path, dest: Path, key: str, delta: float) -> Path:
  shutil.copytree(source, dest)
  tensors = hf_tensors(source)
  tensors[key] = tensors[key] + np.asarray(delta, tensors[key].dtype)
  for f in dest.glob("*.safetensors*"):
    f.unlink()
  sio.save_sharded(sorted(tensors.items()), dest, max_shard_bytes=300_000)
  return dest


def verify_report(capsys, *args) -> tuple[int, dict]:
  capsys.readouterr()
  code = run_cli("verify", *args)
  out = capsys.readouterr().out
  return code, json.loads(out[out.index("{") :])


def test_verify_exits_1_above_atol_on_a_perturbed_weight_and_0_below(sources, tmp_path, capsys):
  perturbed = perturbed_copy(sources["qwen2"], tmp_path / "perturbed", "model.norm.weight", 0.05)
  common = ("--hf-dir", perturbed, "--checkpoint", sources["imported"], "--seq-len", "32")
  code, report = verify_report(capsys, *common, "--no-transformers")
  diff = report["vs_importer_max_abs_diff"]
  assert report["param_max_abs_diff"] == pytest.approx(0.05, rel=1e-3) and diff > 1e-3
  assert code == 1 and not report["ok"]  # above the default atol 1e-3
  code, report = verify_report(capsys, *common, "--atol", str(2 * diff))  # transformers reads the same files
  assert code == 0 and report["ok"] and report["vs_transformers_max_abs_diff"] <= 2 * diff
  code, report = verify_report(capsys, *common, "--no-transformers", "--atol", str(diff / 2))
  assert code == 1 and not report["ok"]


def test_verify_seed_chooses_the_input(sources, capsys):
  common = ("--hf-dir", sources["qwen2"], "--checkpoint", sources["imported"], "--seq-len", "24", "--no-transformers")
  _, a = verify_report(capsys, *common, "--seed", "1")
  _, b = verify_report(capsys, *common, "--seed", "2")
  assert a["logits_max_abs"] != b["logits_max_abs"]  # a different random prompt
  assert "vs_transformers_max_abs_diff" not in a  # --no-transformers


# --- stitch --------------------------------------------------------------------------------------------


def test_stitch_image_token_id_dtype_and_seed(sources, tmp_path):
  def stitch(name, *extra):
    assert (
      run_cli(
        "stitch",
        "--vision",
        sources["vit"],
        "--llm",
        sources["imported"],
        "--variant",
        "d",
        "--out",
        tmp_path / name,
        "--quiet",
        *extra,
      )
      == 0
    )
    return stored_params(tmp_path / name)

  a = stitch("a", "--image-token-id", "7", "--dtype", "bfloat16", "--seed", "2")
  b = stitch("b", "--seed", "1")
  c = stitch("c", "--seed", "2")  # as b but the seed
  model, _ = models.load_checkpoint(tmp_path / "a")
  assert model.config.image_token_id == 7
  assert models.load_checkpoint(tmp_path / "b")[0].config.image_token_id == rm.TINY_TEXT["vocab_size"]
  assert {v.dtype for v in a.values()} == {np.dtype(ml_dtypes.bfloat16)}
  assert {v.dtype for v in c.values()} == {np.dtype(np.float32)}  # auto: the LLM's
  llm = stored_params(sources["imported"])
  path = "decoder/layers/mlp/up_proj/kernel"
  np.testing.assert_array_equal(a[f"language_model/{path}"], llm[path].astype(ml_dtypes.bfloat16))
  fresh = "projector/linear_1/kernel"
  assert not np.array_equal(b[fresh], c[fresh])  # seeds 1 and 2


def test_verify_tiles_sets_the_image_tiles_of_the_nvlm_input(sources, tmp_path, capsys):
  assert (
    run_cli(
      "stitch",
      "--vision",
      sources["vit"],
      "--llm",
      sources["imported"],
      "--variant",
      "d",
      "--out",
      tmp_path / "d",
      "--quiet",
    )
    == 0
  )
  assert (
    run_cli("export", "--checkpoint", tmp_path / "d", "--out", tmp_path / "hf", "--layout", "nvlm_d", "--quiet") == 0
  )
  common = ("--hf-dir", tmp_path / "hf", "--checkpoint", tmp_path / "d", "--seq-len", "24", "--atol", "1e-4")
  code, three = verify_report(capsys, *common, "--tiles", "3")
  assert code == 0 and three["inputs"]["pixel_values"][1] == 3
  code, text_only = verify_report(capsys, *common, "--tiles", "0")
  assert code == 0 and "pixel_values" not in text_only["inputs"]


def test_stitch_xattn_offset_places_the_block_within_each_group(sources, tmp_path):
  """--xattn-every 3 --xattn-offset 0: each block runs before LLM layer 3 g, so every LLM layer of the group
  comes after it."""
  out = tmp_path / "x"
  assert (
    run_cli(
      "stitch",
      "--vision",
      sources["vit"],
      "--llm",
      sources["qwen2"],
      "--variant",
      "x",
      "--xattn-every",
      "3",
      "--xattn-offset",
      "0",
      "--out",
      out,
      "--quiet",
    )
    == 0
  )
  model, _ = models.load_checkpoint(out)
  assert (model.config.cross_attention.every, model.config.cross_attention.offset) == (3, 0)
  stored = stored_params(out)
  groups = "language_model/decoder/groups/"
  assert not any(p.startswith(groups + "layers_before/") for p in stored)
  up = hf_tensors(sources["qwen2"])
  for i in range(3):
    np.testing.assert_array_equal(
      stored[groups + "layers_after/mlp/up_proj/kernel"][0, i], up[f"model.layers.{i}.mlp.up_proj.weight"].T
    )
