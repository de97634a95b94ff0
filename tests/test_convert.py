"""`python -m nvlm_jax.convert`: import / export round trips for every layout, bad input, verify,
inspect, stitch.

Tiny checkpoints are built here: transformers Qwen2 / Llama / InternVL models saved with small shards
(reference_models.py), and the NVLM-D-72B layout written with safetensors directly (bf16, ViT padded
with zero dummy heads; test_nvlm_d.write_nvlm_d_checkpoint). The CLI runs in-process through
`convert.main`, except for the one test that kills a conversion midway.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import reference_models as rm
import torch
from test_nvlm_d import build_torch_internvl, write_nvlm_d_checkpoint
from test_vision import build_torch_vit

from nvlm_jax import convert, models
from nvlm_jax.checkpoint import orbax_checkpoint, orbax_stream
from nvlm_jax.checkpoint import safetensors_io as sio
from nvlm_jax.checkpoint.convert.output import TMP_MARKER

NVLM_D_KEY = "vision_model.encoder.layers.1.attn.qkv.weight"


def run_cli(*args) -> int:
  return convert.main([str(a) for a in args])


def hf_tensors(directory) -> dict[str, np.ndarray]:
  ckpt = sio.SafetensorsCheckpoint(directory)
  return {k: np.array(ckpt.read(k)) for k in ckpt}


def assert_same_hf(a, b):
  """Same keys, same dtypes, same bytes."""
  ta, tb = hf_tensors(a), hf_tensors(b)
  assert set(ta) == set(tb), sorted(set(ta) ^ set(tb))[:5]
  for key in ta:
    assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
    assert ta[key].tobytes() == tb[key].tobytes(), key


def stored_params(workdir) -> dict[str, np.ndarray]:
  directory, step = orbax_checkpoint.resolve_step(workdir, None)
  reader = orbax_stream.ParamReader(directory / str(step) / "params")
  return {p: reader.read(p) for p in reader.arrays}


def assert_same_params(a: dict, b: dict):
  assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
  for path in a:
    assert a[path].dtype == b[path].dtype and a[path].shape == b[path].shape, path
    assert a[path].tobytes() == b[path].tobytes(), path


def assert_nothing_written(parent: Path, name: str):
  assert not (parent / name).exists()
  assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}{TMP_MARKER}")]


# ----------------------------------------------------------------------------------------------------
# Tiny source checkpoints


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """layout -> Hugging Face directory (and the torch models that wrote them)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  qwen2 = rm.build_causal_lm(rm.tiny_qwen2_config(), seed=0)
  out["qwen2"] = rm.save(qwen2, root / "qwen2")
  llama = rm.build_causal_lm(rm.tiny_llama_config(), seed=1)
  out["llama"] = rm.save(llama, root / "llama", dtype=torch.bfloat16)  # a bf16 source
  out["internvl"] = rm.save(build_torch_internvl(seed=5), root / "internvl", max_shard_size="100KB")
  nvlm = build_torch_internvl(seed=7, intermediate_size=rm.TINY_TEXT["hidden_size"])
  (root / "nvlm_d").mkdir()
  out["nvlm_d"] = write_nvlm_d_checkpoint(nvlm, root / "nvlm_d", stored_heads=8)  # 4 real + 4 zero heads, bf16
  out["nvlm_d_model"] = nvlm
  out["vit"] = rm.save(build_torch_vit("6b", seed=3), root / "vit", max_shard_size="20KB")
  (out["qwen2"] / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
  return out


@pytest.fixture(scope="module")
def imported(hf, tmp_path_factory):
  """layout -> our checkpoint imported from hf[layout] (dtype auto)."""
  root = tmp_path_factory.mktemp("imported")
  out = {}
  for layout in ("qwen2", "llama", "internvl", "nvlm_d"):
    assert run_cli("import", "--hf-dir", hf[layout], "--out", root / layout, "--quiet") == 0
    out[layout] = root / layout
  return out


# ----------------------------------------------------------------------------------------------------
# Round trips


EXPORT_ARGS = {"qwen2": [], "llama": [], "internvl": [], "nvlm_d": ["--pad-dummy-heads"]}


@pytest.mark.parametrize("layout", ["qwen2", "llama", "internvl", "nvlm_d"])
def test_import_export_import_is_bit_identical(hf, imported, tmp_path, layout):
  exported = tmp_path / "exported"
  assert (
    run_cli(
      "export",
      "--checkpoint",
      imported[layout],
      "--out",
      exported,
      "--layout",
      layout,
      "--max-shard-size",
      "100KB",
      "--quiet",
      *EXPORT_ARGS[layout],
    )
    == 0
  )
  assert_same_hf(hf[layout], exported)  # the files themselves, dummy heads and bf16 included
  assert (exported / sio.INDEX_FILE).is_file() and len(list(exported.glob("model-*.safetensors"))) > 1
  again = tmp_path / "again"
  assert run_cli("import", "--hf-dir", exported, "--out", again, "--quiet") == 0
  assert_same_params(stored_params(imported[layout]), stored_params(again))
  assert json.loads((again / orbax_checkpoint.MODEL_DESCRIPTION_FILE).read_text()) == json.loads(
    (imported[layout] / orbax_checkpoint.MODEL_DESCRIPTION_FILE).read_text()
  )


def test_stored_dtypes_follow_the_source(hf, imported):
  assert {a.dtype for a in stored_params(imported["qwen2"]).values()} == {np.dtype(np.float32)}
  for layout in ("llama", "nvlm_d"):
    assert {a.dtype for a in stored_params(imported[layout]).values()} == {np.dtype(ml_dtypes.bfloat16)}
  desc = json.loads((imported["nvlm_d"] / orbax_checkpoint.MODEL_DESCRIPTION_FILE).read_text())
  assert desc["config"]["llm"]["param_dtype"] == "bfloat16" and desc["config"]["vision"]["num_heads"] == 4
  # tokenizer files travel along (the NVLM-D one names the placeholder, the Qwen2 one was added above)
  assert (imported["nvlm_d"] / "tokenizer_config.json").is_file()
  assert (imported["qwen2"] / "tokenizer_config.json").is_file()


def test_unpadded_nvlm_d_export_reimports(imported, tmp_path):
  """Without --pad-dummy-heads the ViT is stored with its real heads; the importer reads either."""
  exported = tmp_path / "unpadded"
  assert run_cli("export", "--checkpoint", imported["nvlm_d"], "--out", exported, "--layout", "nvlm_d", "--quiet") == 0
  assert sio.SafetensorsCheckpoint(exported)[NVLM_D_KEY].shape == (3 * 4 * 8, 32)
  assert "num_dummy_heads" not in json.loads((exported / "config.json").read_text())["vision_config"]
  again = tmp_path / "again"
  assert run_cli("import", "--hf-dir", exported, "--out", again, "--quiet") == 0
  assert_same_params(stored_params(imported["nvlm_d"]), stored_params(again))


def test_unrolled_layers_round_trip(hf, tmp_path):
  out, exported = tmp_path / "unrolled", tmp_path / "exported"
  assert run_cli("import", "--hf-dir", hf["qwen2"], "--out", out, "--no-scan-layers", "--quiet") == 0
  params = stored_params(out)
  assert "decoder/layers_2/mlp/up_proj/kernel" in params and not any("/layers/" in p for p in params)
  assert run_cli("export", "--checkpoint", out, "--out", exported, "--layout", "qwen2", "--quiet") == 0
  assert_same_hf(hf["qwen2"], exported)


def test_import_restores_onto_a_mesh_with_shard_aligned_chunks(hf, tmp_path):
  from nvlm_jax.models import load_pretrained
  from nvlm_jax.sharding import create_mesh

  out = tmp_path / "meshed"
  assert run_cli("import", "--hf-dir", hf["qwen2"], "--out", out, "--mesh", "fsdp=4,tensor=2", "--quiet") == 0
  directory, step = orbax_checkpoint.resolve_step(out, None)
  chunks = orbax_stream.ParamReader(directory / str(step) / "params").arrays
  assert chunks["decoder/layers/self_attn/q_proj/kernel"].chunks == (1, 16, 2, 16)  # one layer of one shard
  mesh = create_mesh({"fsdp": 4, "tensor": 2})
  model, params = models.load_checkpoint(out, mesh=mesh)  # orbax restores what we wrote, resharded
  _, reference = load_pretrained(hf["qwen2"])
  q = params["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (3, 16, 2, 16)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, reference)


def test_bf16_to_fp32_import_is_exact(hf, tmp_path):
  out = tmp_path / "fp32"
  assert run_cli("import", "--hf-dir", hf["llama"], "--out", out, "--dtype", "float32", "--quiet") == 0
  params = stored_params(out)
  source = hf_tensors(hf["llama"])
  assert params["embed_tokens/embedding"].dtype == np.float32
  np.testing.assert_array_equal(
    params["embed_tokens/embedding"], source["model.embed_tokens.weight"].astype(np.float32)
  )


# ----------------------------------------------------------------------------------------------------
# verify and inspect


@pytest.mark.parametrize("layout", ["qwen2", "internvl"])
def test_verify_against_importer_and_transformers_on_exported_files(imported, tmp_path, capsys, layout):
  """verify on the *exported* directory: our config.json writers must satisfy transformers too."""
  exported = tmp_path / "exported"
  assert run_cli("export", "--checkpoint", imported[layout], "--out", exported, "--layout", layout, "--quiet") == 0
  capsys.readouterr()
  assert (
    run_cli("verify", "--hf-dir", exported, "--checkpoint", imported[layout], "--seq-len", "96", "--atol", "1e-4") == 0
  )
  out = capsys.readouterr().out
  report = json.loads(out[out.index("{") :])
  print(report)
  assert report["param_max_abs_diff"] == 0.0 and report["vs_importer_max_abs_diff"] == 0.0
  assert report["vs_transformers_max_abs_diff"] <= 1e-4
  if layout == "internvl":
    assert report["inputs"]["pixel_values"][1] == 2


def test_verify_nvlm_d_skips_transformers_and_flags_a_mismatch(hf, imported, capsys):
  assert run_cli("verify", "--hf-dir", hf["nvlm_d"], "--checkpoint", imported["nvlm_d"]) == 0
  out = capsys.readouterr().out
  assert "skipped (transformers has no built-in NVLM_D)" in out
  # a checkpoint that is not the conversion of these files
  assert run_cli("verify", "--hf-dir", hf["qwen2"], "--checkpoint", imported["llama"]) == 1


def test_inspect_both_kinds(hf, imported, capsys):
  assert run_cli("inspect", hf["nvlm_d"], "--json") == 0
  report = json.loads(capsys.readouterr().out)
  assert report["layout"] == "NVLM_D" and len(report["tensors"]) == len(sio.SafetensorsCheckpoint(hf["nvlm_d"]))
  qkv = next(r for r in report["mapping"] if r["hf_keys"] == ["vision_model.encoder.layers.{layer}.attn.qkv.weight"])
  assert qkv["params"][0] == "vision_model/encoder/layers/attn/q_proj/kernel" and "dummy heads" in qkv["transform"]
  assert qkv["stacked"] and qkv["layers"] == 3
  assert run_cli("inspect", imported["qwen2"]) == 0
  text = capsys.readouterr().out
  assert "decoder/layers/self_attn/q_proj/kernel  [3, 64, 4, 16] float32" in text
  assert "model.layers.{layer}.self_attn.q_proj.weight [64, 64] -> decoder/layers/self_attn/q_proj/kernel" in text


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error naming file and key, exit status 1, nothing left behind


def _rewrite(source: Path, dest: Path, edit) -> Path:
  """A copy of an HF directory whose tensors went through `edit(dict)`, in two shards."""
  tensors = hf_tensors(source)
  edit(tensors)
  dest.mkdir()
  sio.save_sharded(sorted(tensors.items()), dest, max_shard_bytes=300_000)
  shutil.copy(source / "config.json", dest / "config.json")
  return dest


def _truncate(d: Path) -> Path:
  shard = sorted(d.glob("model-*.safetensors"))[1]
  with open(shard, "r+b") as f:
    f.truncate(shard.stat().st_size - 100)
  return d


def _drop_shard(d: Path) -> Path:
  sorted(d.glob("model-*.safetensors"))[0].unlink()
  return d


BAD_INPUTS = {
  "truncated shard": (lambda src, d: _truncate(_copy(src, d)), r"model-00002-of-\d+\.safetensors.*truncated"),
  "shard missing": (
    lambda src, d: _drop_shard(_copy(src, d)),
    r"model\.safetensors\.index\.json: shard model-00001-of-\d+\.safetensors is missing",
  ),
  "unknown key": (
    lambda src, d: _rewrite(src, d, lambda t: t.update({"model.layers.1.mlp.extra.weight": np.ones(3)})),
    r"unknown key.*'model\.layers\.1\.mlp\.extra\.weight' \(model-0000\d-of-\d+\.safetensors\)",
  ),
  "missing key": (
    lambda src, d: _rewrite(src, d, lambda t: t.pop("model.layers.2.self_attn.k_proj.bias")),
    r"missing.*'model\.layers\.2\.self_attn\.k_proj\.bias'",
  ),
  "wrong shape": (
    lambda src, d: _rewrite(
      src, d, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((100, 64), np.float32)})
    ),
    r"'model\.layers\.0\.mlp\.up_proj\.weight' in model-0000\d-of-\d+\.safetensors: expected shape "
    r"\(160, 64\), found \(100, 64\)",
  ),
}


def _copy(src: Path, dest: Path) -> Path:
  shutil.copytree(src, dest)
  return dest


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_file_and_key(hf, tmp_path, capsys, case):
  make, pattern = BAD_INPUTS[case]
  source = make(hf["qwen2"], tmp_path / "source")
  assert run_cli("import", "--hf-dir", source, "--out", tmp_path / "out", "--quiet") == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ")
  assert re.search(pattern, err, re.S), err
  assert_nothing_written(tmp_path, "out")


def test_nonzero_dummy_heads_fail_midway_and_leave_nothing(hf, tmp_path, capsys):
  source = tmp_path / "poisoned"
  source.mkdir()
  write_nvlm_d_checkpoint(hf["nvlm_d_model"], source, stored_heads=8, poison=(NVLM_D_KEY, 64 + 40))
  assert run_cli("import", "--hf-dir", source, "--out", tmp_path / "out", "--quiet") == 1
  err = capsys.readouterr().err
  assert "vision_model.encoder.layers.1.attn.qkv.weight" in err and "not zero" in err and "k heads 4..7" in err
  assert_nothing_written(tmp_path, "out")


def test_existing_target_is_refused_and_left_alone(hf, imported, tmp_path, capsys):
  target = tmp_path / "exists"
  target.mkdir()
  (target / "keep.txt").write_text("mine")
  assert run_cli("import", "--hf-dir", hf["qwen2"], "--out", target, "--quiet") == 1
  assert "already exists" in capsys.readouterr().err
  assert run_cli("export", "--checkpoint", imported["qwen2"], "--out", target, "--layout", "qwen2", "--quiet") == 1
  assert "already exists" in capsys.readouterr().err
  assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_export_refuses_layouts_that_cannot_hold_the_model(imported, tmp_path, capsys):
  cases = [
    (imported["qwen2"], "llama", "has q/k/v biases"),
    (imported["llama"], "qwen2", "no q/k/v biases"),
    (imported["nvlm_d"], "internvl", "use --layout nvlm_d"),
    (imported["qwen2"], "nvlm_d", "needs an NVLM-D"),
    (imported["internvl"], "qwen2 --pad-dummy-heads", "--pad-dummy-heads applies to --layout nvlm_d only"),
  ]
  for checkpoint, layout, message in cases:
    assert (
      run_cli("export", "--checkpoint", checkpoint, "--out", tmp_path / "out", "--layout", *layout.split(), "--quiet")
      == 1
    )
    assert message in capsys.readouterr().err
    assert_nothing_written(tmp_path, "out")


def test_export_of_the_language_model_of_an_nvlm_checkpoint(imported, hf, tmp_path):
  out = tmp_path / "llm"
  assert run_cli("export", "--checkpoint", imported["internvl"], "--out", out, "--layout", "qwen2", "--quiet") == 0
  source = hf_tensors(hf["internvl"])
  exported = hf_tensors(out)
  for key, value in exported.items():
    original = (
      key.replace("model.", "language_model.model.", 1) if key.startswith("model.") else "language_model." + key
    )
    np.testing.assert_array_equal(value, source[original], err_msg=key)


def test_interrupted_import_removes_its_temporary_directory(hf, tmp_path, monkeypatch):
  calls = []
  original = orbax_stream.ParamWriter.write

  def interrupt(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return original(self, *args, **kwargs)

  monkeypatch.setattr(orbax_stream.ParamWriter, "write", interrupt)
  with pytest.raises(KeyboardInterrupt):
    run_cli("import", "--hf-dir", hf["qwen2"], "--out", tmp_path / "out", "--quiet")
  assert_nothing_written(tmp_path, "out")


def test_killed_import_leaves_nothing_that_looks_complete(hf, tmp_path):
  """SIGKILL-like death midway (os._exit: no cleanup runs): only a hidden temporary directory remains,
  and converting again into the same target works."""
  script = textwrap.dedent(f"""
      import os
      from nvlm_jax import convert
      from nvlm_jax.checkpoint import orbax_stream
      original, calls = orbax_stream.ParamWriter.write, []
      def die(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
          os._exit(9)
        return original(self, *a, **k)
      orbax_stream.ParamWriter.write = die
      convert.main(["import", "--hf-dir", {str(hf["qwen2"])!r}, "--out", {str(tmp_path / "out")!r}, "--quiet"])
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(convert.__file__).parents[1])}
  assert subprocess.run([sys.executable, "-c", script], env=env, timeout=120).returncode == 9
  assert not (tmp_path / "out").exists()
  leftovers = [p.name for p in tmp_path.iterdir()]
  assert len(leftovers) == 1 and leftovers[0].startswith(f".out{TMP_MARKER}")
  assert run_cli("import", "--hf-dir", hf["qwen2"], "--out", tmp_path / "out", "--quiet") == 0
  assert orbax_checkpoint.is_training_checkpoint(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------
# stitch


def test_stitch_d_loads_and_generates(hf, imported, tmp_path):
  from nvlm_jax.fusion.nvlm_d import NVLMD
  from nvlm_jax.generation import generate

  out = tmp_path / "stitched"
  # the ViT from a Hugging Face directory, the LLM from one of our checkpoints
  assert (
    run_cli("stitch", "--vision", hf["vit"], "--llm", imported["qwen2"], "--variant", "d", "--out", out, "--quiet") == 0
  )
  model, params = models.load_checkpoint(out)
  cfg = model.config
  assert isinstance(model, NVLMD) and cfg.image_token_id == rm.TINY_TEXT["vocab_size"]  # one past the vocabulary
  assert (cfg.projector.in_features, cfg.projector.hidden_size, cfg.projector.use_bias) == (128, 160, False)
  stored = stored_params(out)
  llm = stored_params(imported["qwen2"])
  for path, value in llm.items():
    np.testing.assert_array_equal(stored[f"language_model/{path}"], value)
  vit = hf_tensors(hf["vit"])
  np.testing.assert_array_equal(stored["vision_model/encoder/layers/ls1"][2], vit["encoder.layer.2.lambda_1"])
  fresh = [p for p in stored if p.startswith("projector/")]
  assert sorted(fresh) == [
    "projector/linear_1/kernel",
    "projector/linear_2/kernel",
    "projector/norm/bias",
    "projector/norm/scale",
  ]
  assert np.std(stored["projector/linear_1/kernel"]) > 0
  summary = json.loads((out / "nvlm_convert.json").read_text())
  assert summary["fresh_params"] == sorted(fresh)

  tiles, per_tile = 2, cfg.tokens_per_tile
  ids = np.full((1, 8 + tiles * per_tile), 5, np.int32)
  ids[0, 4 : 4 + tiles * per_tile] = cfg.image_token_id
  pixels = np.random.default_rng(0).standard_normal((1, tiles, 56, 56, 3)).astype(np.float32)
  tokens = generate(model, params, ids, max_new_tokens=4, pixel_values=pixels, tile_mask=np.ones((1, tiles), bool))
  assert tokens.shape == (1, 4) and np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < 384))


def test_stitch_checks_the_towers_and_the_variant(hf, imported, tmp_path, capsys):
  assert (
    run_cli(
      "stitch",
      "--vision",
      imported["qwen2"],
      "--llm",
      imported["qwen2"],
      "--variant",
      "d",
      "--out",
      tmp_path / "out",
      "--quiet",
    )
    == 1
  )
  assert "expected a VisionConfig" in capsys.readouterr().err
  # 3 LLM layers cannot hold the paper's 10 cross-attention blocks: the error says what to set
  assert (
    run_cli(
      "stitch", "--vision", hf["vit"], "--llm", hf["qwen2"], "--variant", "x", "--out", tmp_path / "out", "--quiet"
    )
    == 1
  )
  assert "--xattn-every" in capsys.readouterr().err
  assert (
    run_cli(
      "stitch",
      "--vision",
      hf["vit"],
      "--llm",
      hf["qwen2"],
      "--variant",
      "d",
      "--xattn-every",
      "1",
      "--out",
      tmp_path / "out",
      "--quiet",
    )
    == 1
  )
  assert "apply to --variant x and h only" in capsys.readouterr().err
  assert_nothing_written(tmp_path, "out")


def test_stitch_x_regroups_the_llm_layers_and_starts_as_the_llm(hf, tmp_path):
  import jax.numpy as jnp
  from flax import traverse_util

  from nvlm_jax.fusion.nvlm_x import NVLMX

  qwen = rm.build_causal_lm(rm.tiny_qwen2_config(num_hidden_layers=4), seed=11)
  llm_dir = rm.save(qwen, tmp_path / "qwen2_4l")
  out = tmp_path / "x"
  assert (
    run_cli(
      "stitch", "--vision", hf["vit"], "--llm", llm_dir, "--variant", "x", "--xattn-every", "2", "--out", out, "--quiet"
    )
    == 0
  )
  model, params = models.load_checkpoint(out)
  assert isinstance(model, NVLMX) and model.config.cross_attention.every == 2
  flat = traverse_util.flatten_dict(params, sep="/")
  groups = "language_model/decoder/groups/"
  assert float(jnp.max(jnp.abs(flat[groups + "cross_attn/attn_gate"]))) == 0.0
  assert float(jnp.max(jnp.abs(flat[groups + "cross_attn/mlp_gate"]))) == 0.0
  # LLM layer i = 2 g + j: j = 0 before the block, j = 1 after it (offset = every - 1 = 1)
  source = hf_tensors(llm_dir)
  up = lambda i: source[f"model.layers.{i}.mlp.up_proj.weight"].T
  np.testing.assert_array_equal(np.asarray(flat[groups + "layers_before/mlp/up_proj/kernel"][1, 0]), up(2))
  np.testing.assert_array_equal(np.asarray(flat[groups + "layers_after/mlp/up_proj/kernel"][1, 0]), up(3))
  ids = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (1, 96), seed=2)
  logits = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids)))(params)
  assert float(np.max(np.abs(np.asarray(logits) - rm.torch_logits(qwen, ids)))) <= 1e-4  # gates 0: the LLM


def test_stitch_h_from_released_parts_takes_the_tokenizer_ids_and_loads_onto_a_mesh(hf, tmp_path):
  """A tiny Qwen2 dir (with the tiny tokenizer) + the tiny InternViT-6B-style dir (transformers layouts) -> NVLM-H: the
  placeholder and `<Image>` ids from the LLM's tokenizer, H's mlp1 projector, gates zero, fresh blocks ~ N(0, 0.02),
  text logits equal the torch Qwen2's; the output is one of our checkpoints and restores onto a mesh."""
  import jax.numpy as jnp

  from nvlm_jax.checkpoint import orbax_checkpoint
  from nvlm_jax.fusion.nvlm_h import NVLMH
  from nvlm_jax.processing.tokenizer import build_tiny_tokenizer

  qwen = rm.build_causal_lm(rm.tiny_qwen2_config(num_hidden_layers=4, tie_word_embeddings=False), seed=3)
  llm_dir = rm.save(qwen, tmp_path / "llm")
  build_tiny_tokenizer(None, vocab_size=384, out_dir=llm_dir)
  out = tmp_path / "nvlm_h_init"
  cli = ["stitch", "--vision", hf["vit"], "--llm", llm_dir, "--variant", "h", "--xattn-every", "2", "--out", out]
  assert run_cli(*cli, "--quiet") == 0
  assert orbax_checkpoint.is_training_checkpoint(out) and orbax_checkpoint.resolve_step(out, None)[1] == 0
  model, params = models.load_model(out)
  cfg = model.config
  assert isinstance(model, NVLMH) and cfg.image_token_id == 3  # <|vision_pad|> of the tiny tokenizer
  assert cfg.image_start_token_ids and cfg.projector.hidden_size == rm.TINY_TEXT["intermediate_size"]
  gates = params["language_model"]["decoder"]["groups"]["cross_attn"]
  assert float(jnp.max(jnp.abs(gates["attn_gate"]))) == 0 and float(jnp.max(jnp.abs(gates["mlp_gate"]))) == 0
  assert 0.015 < float(jnp.std(gates["q_proj"]["kernel"])) < 0.025  # N(0, 0.02)
  ids = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (1, 300), seed=1)
  ids[ids == cfg.image_token_id] = 5
  ours = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids)))(params)
  diff = float(np.max(np.abs(np.asarray(ours) - rm.torch_logits(qwen, ids))))
  print(f"NVLM-H stitched from parts vs torch Qwen2, 300 tokens: max abs logit diff {diff:.2e}")
  assert diff <= 1e-4
  if jax.device_count() >= 4:  # restored straight onto a mesh (what train.py's init_from does)
    from jax.sharding import PartitionSpec as P

    from nvlm_jax import sharding

    mesh = sharding.create_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    loaded_model, on_mesh = models.load_checkpoint(out, mesh=mesh)
    assert loaded_model.config == cfg
    kernel = on_mesh["language_model"]["decoder"]["groups"]["cross_attn"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), on_mesh, params)


@pytest.fixture(scope="module")
def trainer_workdir(tmp_path_factory) -> Path:
  """What the trainer leaves (nvlm_model.json, checkpoints/0, tokenizer/, processor.json) for the tiny NVLM-D
  with the demo tokenizer, whose placeholder id (3) is not NVLM-D-72B's (151654); random weights."""
  import ml_collections

  import flax.linen as nn

  from nvlm_jax import presets
  from nvlm_jax.data import processor_setup

  directory = tmp_path_factory.mktemp("run")
  cfg = presets.get_preset("tiny_nvlm_d")
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=512))
  data = ml_collections.ConfigDict({"tokenizer": "tiny_synthetic", "processor": {"tile_tag_format": "2d_grid"}})
  processor, kwargs = processor_setup.build_processor(data, cfg)
  cfg = processor_setup.sync_model_config(cfg, processor)
  init = models.init_fn(models.module_for_config(cfg), cfg)
  models.save_checkpoint(directory, cfg, nn.meta.unbox(jax.jit(init)(jax.random.key(0)))["params"])
  processor_setup.save_processor(directory, processor, kwargs)
  return directory


def test_export_of_a_trainer_workdir_stands_alone(trainer_workdir, tmp_path):
  """The exported directory carries the run's tokenizer (WORKDIR/tokenizer/), chat template and processor
  settings, and every loader takes the placeholder id from its config.json: the same inputs and logits."""
  import jax.numpy as jnp

  import nvlm_jax

  workdir = trainer_workdir
  out = tmp_path / "hf"
  assert run_cli("export", "--checkpoint", workdir, "--out", out, "--layout", "nvlm_d", "--quiet") == 0
  assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
  assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
  config = json.loads((out / "config.json").read_text())
  assert config["image_token_id"] == 3 and config["nvlm_jax"]["tile_tag_format"] == "2d_grid"

  ours, ours_params = nvlm_jax.load_pretrained(workdir)
  exported, exported_params = nvlm_jax.load_pretrained(out)
  assert exported.config.image_token_id == ours.config.image_token_id == 3
  messages = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
  from PIL import Image

  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 200, 3), dtype=np.uint8))
  a = nvlm_jax.load_processor(workdir)(messages, [image], add_generation_prompt=True)
  b = nvlm_jax.Processor.from_pretrained(out)(messages, [image], add_generation_prompt=True)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  run = lambda model, params: model.apply(
    {"params": params},
    jnp.asarray(a["input_ids"]),
    pixel_values=jnp.asarray(a["pixel_values"]),
    tile_mask=jnp.asarray(a["tile_mask"]),
  )
  np.testing.assert_allclose(np.asarray(run(exported, exported_params)), np.asarray(run(ours, ours_params)), atol=1e-5)


def test_config_json_image_token_id_decides_the_placeholder_of_every_loader(trainer_workdir, tmp_path):
  """Not the tokenizer's `<|vision_pad|>` (id 3), not NVLM-D-72B's 151654: config.json's id (4 here); an id the
  tokenizer lacks is an error naming both."""
  import nvlm_jax

  workdir = trainer_workdir
  out = tmp_path / "hf"
  assert run_cli("export", "--checkpoint", workdir, "--out", out, "--layout", "nvlm_d", "--quiet") == 0
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**config, "image_token_id": 4}))
  model, _ = nvlm_jax.load_pretrained(out)
  processor = nvlm_jax.Processor.from_pretrained(out)
  assert model.config.image_token_id == processor.image_context_id == 4
  assert processor.image_context_token == "<IMG_CONTEXT>"
  (out / "config.json").write_text(json.dumps({**config, "image_token_id": 151654}))
  with pytest.raises(ValueError, match=r"image_token_id 151654 is not in the vocabulary"):
    nvlm_jax.Processor.from_pretrained(out)
