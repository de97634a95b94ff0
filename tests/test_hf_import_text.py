"""HF Qwen2 / Llama checkpoint import: logits parity with transformers, layouts, sharding, export, errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import nvlm_jax
from nvlm_jax.checkpoint import hf_import, safetensors_io as sio, text_layouts
from nvlm_jax.checkpoint.mapping import RuleTable, linear, per_layer, rename
from nvlm_jax.checkpoint.safetensors_io import CheckpointError
from nvlm_jax.checkpoint.text_layouts import ConfigError, decoder_config_from_hf
from nvlm_jax.sharding import LOGICAL_AXIS_RULES, create_mesh, shardings_for
import reference_models as rm

TOL = 1e-4
SEQ = 512


@pytest.fixture(scope="module")
def tokens():
  return rm.random_tokens(rm.TINY_TEXT["vocab_size"], (2, SEQ), seed=1)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, tokens):
  """name -> (torch model, saved directory, reference logits); each built once."""
  configs = {
    "qwen2": rm.tiny_qwen2_config(),
    "llama": rm.tiny_llama_config(),
    "llama_tied": rm.tiny_llama_config(tie_word_embeddings=True),
  }
  out = {}
  for seed, (name, config) in enumerate(configs.items()):
    model = rm.build_causal_lm(config, seed=seed)
    directory = rm.save(model, tmp_path_factory.mktemp(name))
    out[name] = (model, directory, rm.torch_logits(model, tokens))
  return out


def _logits(model, params, tokens):
  return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(tokens)))


# ----------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("name", ["qwen2", "llama", "llama_tied"])
def test_logits_match_transformers(refs, tokens, name, scan_layers):
  _, directory, expected = refs[name]
  assert (directory / sio.INDEX_FILE).is_file() and len(list(directory.glob("model-*.safetensors"))) > 1
  model, params = nvlm_jax.load_pretrained(directory, scan_layers=scan_layers)
  got = _logits(model, params, tokens)
  diff = float(np.max(np.abs(got - expected)))
  print(f"{name} scan_layers={scan_layers}: max |logits diff| = {diff:.3g} (|logits| max {np.abs(expected).max():.3g})")
  assert got.shape == expected.shape
  assert diff <= TOL


def test_config_and_param_tree_follow_the_files(refs):
  _, directory, _ = refs["llama_tied"]
  model, params = nvlm_jax.load_pretrained(directory, scan_layers=False)
  cfg = model.config
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta) == (3, 4, 2, 1e6)
  assert cfg.tie_word_embeddings and not cfg.qkv_bias and "lm_head" not in params
  assert set(params["decoder"]) == {"layers_0", "layers_1", "layers_2"}
  assert params["decoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"].shape == (64, 4, 16)

  _, directory, _ = refs["qwen2"]
  model, params = nvlm_jax.load_pretrained(directory)
  assert model.config.qkv_bias and model.config.scan_layers
  layers = params["decoder"]["layers"]
  assert layers["self_attn"]["k_proj"]["bias"].shape == (3, 2, 16)
  assert layers["self_attn"]["o_proj"]["kernel"].shape == (3, 4, 16, 64)
  assert params["lm_head"]["kernel"].shape == (64, 384)


def test_sharded_load_places_each_param_on_its_sharding(refs, tokens):
  _, directory, expected_logits = refs["qwen2"]
  mesh = create_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model, params = nvlm_jax.load_pretrained(directory, mesh=mesh)
  _, plain = nvlm_jax.load_pretrained(directory)
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  expected = shardings_for(jax.eval_shape(init), mesh)["params"]
  for got, want, value in zip(jax.tree.leaves(params), jax.tree.leaves(expected), jax.tree.leaves(plain)):
    assert got.sharding.is_equivalent_to(want, got.ndim)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(value))
  q = params["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (3, 16, 2, 16)  # embed / fsdp 4, heads / tensor 2
  # the sharded params run as they are (causal model: the first 128 reference logits still apply)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    got = _logits(model, params, tokens[:, :128])
  assert float(np.max(np.abs(got - expected_logits[:, :128]))) <= TOL


# ----------------------------------------------------------------------------------------------------
# bf16 checkpoints and export


@pytest.fixture(scope="module")
def qwen2_bf16(refs, tmp_path_factory):
  model, _, _ = refs["qwen2"]
  directory = rm.save(model, tmp_path_factory.mktemp("qwen2_bf16"), dtype=torch.bfloat16)
  reference = {k: v.detach().to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()}
  return directory, reference


def test_bf16_checkpoint_loads_as_exact_fp32_upcast(refs, qwen2_bf16, tokens):
  directory, reference = qwen2_bf16
  torch_model = refs["qwen2"][0]
  ckpt = sio.SafetensorsCheckpoint(directory)
  assert {ckpt[k].dtype for k in ckpt} == {"BF16"}
  model, params = nvlm_jax.load_pretrained(directory, dtype=jnp.float32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["embedding"]), reference["model.embed_tokens.weight"])
  q = np.asarray(params["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"][2])
  np.testing.assert_array_equal(q, reference["model.layers.2.self_attn.q_proj.weight"].T.reshape(64, 4, 16))
  exported = dict(text_layouts.qwen2_rules(model.config).to_hf(params))
  assert exported.keys() == reference.keys()
  for key, value in exported.items():
    np.testing.assert_array_equal(value, reference[key], err_msg=key)
  # and the fp32 forward of the upcast weights matches transformers' on the same upcast weights
  upcast = copy.deepcopy(torch_model)  # round the weights only: .to(bf16) would also round RoPE's inv_freq
  with torch.no_grad():
    for p in upcast.parameters():
      p.copy_(p.to(torch.bfloat16).to(torch.float32))
  expected = rm.torch_logits(upcast, tokens[:, :256])
  diff = float(np.max(np.abs(_logits(model, params, tokens[:, :256]) - expected)))
  print(f"bf16 checkpoint, fp32 compute: max |logits diff| = {diff:.3g}")
  assert diff <= TOL


def test_bf16_params_keep_the_exact_bits(qwen2_bf16):
  directory, _ = qwen2_bf16
  ckpt = sio.SafetensorsCheckpoint(directory)
  model, params = nvlm_jax.load_pretrained(directory, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  norm = np.asarray(params["decoder"]["layers"]["post_attn_norm"]["scale"][1])
  assert norm.tobytes() == np.asarray(ckpt.read("model.layers.1.post_attention_layernorm.weight")).tobytes()


@pytest.mark.parametrize("dtype", [None, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_export_round_trips_bit_exactly(refs, qwen2_bf16, tmp_path, dtype):
  source = refs["qwen2"][1] if dtype is None else qwen2_bf16[0]
  model, params = nvlm_jax.load_pretrained(source)
  index = sio.save_sharded(
    text_layouts.qwen2_rules(model.config).to_hf(params, dtype=dtype), tmp_path, max_shard_bytes=60_000
  )
  shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert json.loads(index.read_text())["metadata"]["total_size"] > 0
  original, written = sio.SafetensorsCheckpoint(source), sio.SafetensorsCheckpoint(tmp_path)
  assert set(original) == set(written)
  for key in original:
    assert written[key].dtype == original[key].dtype
    assert np.asarray(written.read(key)).tobytes() == np.asarray(original.read(key)).tobytes(), key
  shutil.copy(source / "config.json", tmp_path)
  _, reloaded = nvlm_jax.load_pretrained(tmp_path)  # our export is itself a loadable checkpoint
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_save_sharded_splits_by_size_and_keeps_oversized_tensors_whole(tmp_path):
  tensors = [
    ("a", np.ones((10,), np.float32)),
    ("big", np.zeros((100,), ml_dtypes.bfloat16)),
    ("c", np.arange(6, dtype=np.int64).reshape(2, 3)),
    ("d", np.ones((3,), np.float32)),
  ]
  sio.save_sharded(iter(tensors), tmp_path, max_shard_bytes=64)
  weight_map = json.loads((tmp_path / sio.INDEX_FILE).read_text())["weight_map"]
  assert weight_map == {
    "a": "model-00001-of-00003.safetensors",
    "big": "model-00002-of-00003.safetensors",
    "c": "model-00003-of-00003.safetensors",
    "d": "model-00003-of-00003.safetensors",
  }
  ckpt = sio.SafetensorsCheckpoint(tmp_path)
  for name, value in tensors:
    np.testing.assert_array_equal(ckpt.read(name), value)
    assert ckpt.read(name).dtype == value.dtype
  from safetensors import safe_open  # the reference reader accepts our files

  with safe_open(str(tmp_path / weight_map["c"]), framework="numpy") as f:
    np.testing.assert_array_equal(f.get_tensor("c"), tensors[2][1])
  with pytest.raises(CheckpointError, match="given twice"):
    sio.save_sharded([("x", np.ones(1)), ("x", np.ones(1))], tmp_path / "dup")


# ----------------------------------------------------------------------------------------------------
# Broken checkpoints


@pytest.fixture
def broken(refs, tmp_path):
  """A writable copy of the Qwen2 checkpoint, plus helpers to damage it."""
  directory = shutil.copytree(refs["qwen2"][1], tmp_path / "ckpt")
  index_file = directory / sio.INDEX_FILE

  class Broken:
    path = directory
    index = json.loads(index_file.read_text())

    def shard_of(self, key):
      return directory / self.index["weight_map"][key]

    def rewrite(self, shard, edit):
      """edit({name: array}) in place for one shard file; the index follows."""
      infos, _ = sio.read_header(shard)
      tensors = {name: np.array(sio.SafetensorsCheckpoint(shard).read(name)) for name in infos}
      edit(tensors)
      sio.write_safetensors(shard, tensors, {"format": "pt"})
      weight_map = {k: v for k, v in self.index["weight_map"].items() if v != shard.name}
      weight_map.update({name: shard.name for name in tensors})
      self.index["weight_map"] = weight_map
      index_file.write_text(json.dumps(self.index))

  return Broken()


def test_missing_shard_names_the_file_and_a_key(broken):
  key = "model.layers.1.mlp.up_proj.weight"
  shard = broken.shard_of(key)
  shard.unlink()
  with pytest.raises(CheckpointError, match=rf"shard {shard.name} is missing \(it holds e\.g\. 'model\.") as e:
    nvlm_jax.load_pretrained(broken.path)
  assert str(e.value).split("holds e.g. ")[1].strip("')") in broken.index["weight_map"]


def test_truncated_shard_names_the_file(broken):
  shard = broken.shard_of("model.norm.weight")
  data = shard.read_bytes()
  shard.write_bytes(data[:-100])
  with pytest.raises(
    CheckpointError,
    match=rf"{shard.name}: truncated safetensors file: header says "
    rf"{len(data)} bytes .*file has {len(data) - 100}",
  ):
    nvlm_jax.load_pretrained(broken.path)


def test_wrong_shape_names_key_file_and_both_shapes(broken):
  key = "model.layers.2.self_attn.k_proj.weight"
  shard = broken.shard_of(key)
  broken.rewrite(shard, lambda t: t.update({key: np.zeros((48, 64), np.float32)}))
  with pytest.raises(CheckpointError, match=rf"'{key}' in {shard.name}: expected shape \(32, 64\), found \(48, 64\)"):
    nvlm_jax.load_pretrained(broken.path)


def test_unknown_key_is_listed_with_its_file(broken):
  shard = broken.shard_of("model.layers.0.mlp.down_proj.weight")
  broken.rewrite(shard, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2), np.float32)}))
  with pytest.raises(
    CheckpointError,
    match=rf"(?s)1 unknown key.*'model\.layers\.0\.mlp\.extra_proj\.weight' "
    rf"\({shard.name}\)",
  ):
    nvlm_jax.load_pretrained(broken.path)


def test_missing_key_is_listed(broken):
  key = "model.layers.2.self_attn.v_proj.bias"
  broken.rewrite(broken.shard_of(key), lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=rf"(?s)1 key\(s\) the Qwen2ForCausalLM layout needs are missing.*'{key}'"):
    nvlm_jax.load_pretrained(broken.path)


def test_index_listing_a_key_its_shard_lacks(broken):
  key = "model.layers.0.input_layernorm.weight"
  shard = broken.shard_of(key)
  weight_map = dict(broken.index["weight_map"])
  broken.rewrite(shard, lambda t: t.pop(key))
  broken.index["weight_map"] = weight_map  # stale index still lists the key
  (broken.path / sio.INDEX_FILE).write_text(json.dumps(broken.index))
  with pytest.raises(CheckpointError, match=rf"lists '{key}' in {shard.name}, but that shard lacks it"):
    nvlm_jax.load_pretrained(broken.path)


def test_duplicate_key_across_shards(broken):
  key = "model.norm.weight"
  other = next(broken.path / f for k, f in broken.index["weight_map"].items() if f != broken.shard_of(key).name)
  broken.rewrite(other, lambda t: t.update({key: np.ones((64,), np.float32)}))
  with pytest.raises(CheckpointError, match=rf"'{key}' is stored twice"):
    nvlm_jax.load_pretrained(broken.path)


def _edit_config(path: Path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  for k, v in changes.items():
    if v is None:
      cfg.pop(k, None)
    else:
      cfg[k] = v
  (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
  "changes, message",
  [
    (
      dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e6, "short_factor": [1.0] * 8}),
      r"config\.json: field 'rope_parameters' asks for RoPE scaling type 'longrope'",
    ),
    (dict(rope_scaling={"type": "su", "factor": 2.0}), r"config\.json: field 'rope_scaling' asks for .*'su'"),
    (dict(hidden_size=None), r"config\.json: required field 'hidden_size' is missing"),
    (dict(use_sliding_window=True), r"config\.json: field 'use_sliding_window' is true"),
    (
      dict(architectures=["MambaForCausalLM"]),
      r"config\.json: field 'architectures' is \['MambaForCausalLM'\].*Known layouts",
    ),
  ],
)
def test_config_errors_name_file_and_field(broken, changes, message):
  _edit_config(broken.path, **changes)
  with pytest.raises(ConfigError, match=message):
    nvlm_jax.load_pretrained(broken.path)


def test_config_that_disagrees_with_the_weights_reports_shapes(broken):
  _edit_config(broken.path, intermediate_size=128)
  with pytest.raises(
    CheckpointError,
    match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' in model-\d+-of-\d+\.safetensors: "
    r"expected shape \(128, 64\), found \(160, 64\)",
  ):
    nvlm_jax.load_pretrained(broken.path)


# ----------------------------------------------------------------------------------------------------
# config.json parsing and the rule framework


def test_decoder_config_reads_every_rope_vintage():
  base = dict(
    model_type="qwen2",
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=8,
  )
  assert (
    decoder_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).rope_theta == 5e5
  )
  assert decoder_config_from_hf({**base, "rope_theta": 1e6, "rope_scaling": None}).rope_theta == 1e6  # transformers 4
  assert decoder_config_from_hf(base).rope_theta == 1e4  # transformers' default
  nested = {"full_attention": {"rope_type": "default", "rope_theta": 2e6}}
  assert (
    decoder_config_from_hf({**base, "layer_types": ["full_attention"], "rope_parameters": nested}).rope_theta == 2e6
  )
  llama = decoder_config_from_hf(
    {**base, "model_type": "llama", "eos_token_id": [2, 7], "head_dim": 4}, scan_layers=False, dtype="bfloat16"
  )
  assert (llama.qkv_bias, llama.eos_token_id, llama.kv_head_dim, llama.scan_layers, llama.dtype) == (
    False,
    (2, 7),
    4,
    False,
    "bfloat16",
  )
  with pytest.raises(ConfigError, match="'attention_bias' is true"):
    decoder_config_from_hf({**base, "model_type": "llama", "attention_bias": True})
  with pytest.raises(ConfigError, match="partial_rotary_factor"):
    decoder_config_from_hf({**base, "partial_rotary_factor": 0.5})
  with pytest.raises(ConfigError, match="unknown DecoderConfig override"):
    decoder_config_from_hf(base, not_a_field=1)


def test_multimodal_prefixes_reroot_the_llm_rules():
  cfg = decoder_config_from_hf(
    dict(
      model_type="qwen2",
      vocab_size=32,
      hidden_size=16,
      num_hidden_layers=2,
      num_attention_heads=2,
      num_key_value_heads=1,
      intermediate_size=8,
    )
  )
  table = text_layouts.decoder_rules(
    cfg, prefix="language_model.model.", lm_head_key="language_model.lm_head.weight", param_prefix="language_model"
  )
  keys, paths = table.hf_shapes(), table.param_shapes()
  assert keys["language_model.model.layers.1.self_attn.q_proj.bias"] == (16,)
  assert keys["language_model.lm_head.weight"] == (32, 16)
  assert paths["language_model/decoder/layers/mlp/up_proj/kernel"] == (2, 16, 8)
  assert paths["language_model/lm_head/kernel"] == (16, 32)
  same = text_layouts.decoder_rules(cfg).with_prefix("language_model.", "language_model")
  assert same.hf_shapes() == keys and same.param_shapes() == paths


def test_rule_tables_compose_and_refuse_conflicts():
  a = RuleTable((rename("w", "x/scale", (3,)),), name="a")
  b = RuleTable(tuple(per_layer([linear("l.{layer}.w", "enc/layers_{layer}/k", (4,), (2, 3))], 2, scan=True)), name="b")
  both = a + b
  assert both.param_shapes() == {"x/scale": (3,), "enc/layers/k": (2, 4, 2, 3)}
  assert both.hf_shapes() == {"w": (3,), "l.0.w": (6, 4), "l.1.w": (6, 4)}
  with pytest.raises(ValueError, match="claimed by two rules"):
    a + RuleTable((rename("w", "y", (3,)),))
  with pytest.raises(ValueError, match="no num_layers"):
    RuleTable((rename("l.{layer}.w", "enc/layers_{layer}/s", (3,)),))


def test_registry_layouts_are_one_entry_each():
  assert {"Qwen2ForCausalLM", "LlamaForCausalLM"} <= set(hf_import.registered_layouts())
  layout = hf_import.detect_layout({"architectures": ["LlamaForCausalLM"]}, keys=())
  assert layout.name == "LlamaForCausalLM"
  assert hf_import.detect_layout({"model_type": "qwen2"}, keys=()).name == "Qwen2ForCausalLM"
