"""NVLM-D: end-to-end logits parity with transformers InternVL, image-token merging, the KV cache,
freezing, and the NVLM-D-72B checkpoint layout (padded ViT heads, mlp1, bf16).

The oracle is a tiny random `InternVLForConditionalGeneration` (InternViT-6B-style vision tower, Qwen2
text model) in fp32 eager mode. Its image features go into the placeholder positions exactly as
NVLM-D's do, so with a bias-free projector whose width equals the LLM's intermediate size it *is* an
NVLM-D model; that is how the NVLM-D-72B layout test gets its reference.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm
import safetensors.torch
import torch
import transformers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_vision import TINY_VISION, VIT_STYLES, random_params

from nvlm_jax import sharding
from nvlm_jax.checkpoint import vision_layouts
from nvlm_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from nvlm_jax.config import NVLMConfig, ProjectorConfig
from nvlm_jax.fusion.nvlm_d import NVLMD, merge_image_features
from nvlm_jax.models import load_pretrained
from nvlm_jax.presets import PRESETS, get_preset

ATOL = 1e-4
VOCAB = rm.TINY_TEXT["vocab_size"]
IMAGE_TOKEN = VOCAB - 1  # the placeholder id of the tiny models
TAG_TOKENS = 5  # `<tile_k>` is 5 text tokens for the Qwen2 tokenizer (docs/paper.md (e))


def build_torch_internvl(seed: int, **text_overrides):
  vision = transformers.InternVLVisionConfig(**TINY_VISION, **VIT_STYLES["6b"])
  text = rm.tiny_qwen2_config(tie_word_embeddings=False, **text_overrides)
  config = transformers.InternVLConfig(
    vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN, tie_word_embeddings=False
  )
  torch.manual_seed(seed)
  model = transformers.InternVLForConditionalGeneration(config)
  for sub in (model.config, model.config.vision_config, model.config.text_config):
    sub._attn_implementation = "eager"
  return rm.randomize_(model, seed).eval()


def torch_logits(model, ids: np.ndarray, tiles: np.ndarray | None) -> np.ndarray:
  """ids [1, L], tiles [n, H, W, 3] (channels last, as ours) -> logits [1, L, V]."""
  pixels = None if tiles is None else torch.as_tensor(tiles).permute(0, 3, 1, 2)
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long), pixel_values=pixels, use_cache=False).logits.numpy()


def multimodal_prompt(num_tiles: int, tokens_per_tile: int, length: int, seed: int, start: int = 17) -> np.ndarray:
  """Random text with `num_tiles` runs of [5 tag tokens][tokens_per_tile placeholders] from `start`."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, IMAGE_TOKEN, size=(length,))
  pos = start
  for _ in range(num_tiles):
    pos += TAG_TOKENS  # tile tag text stays as random text tokens
    ids[pos : pos + tokens_per_tile] = IMAGE_TOKEN
    pos += tokens_per_tile
  assert pos < length
  return ids


def tiles_of(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, 56, 56, 3)).astype(np.float32)


def forward(ours):
  return jax.jit(lambda p, ids, px, mask: ours.apply({"params": p}, ids, pixel_values=px, tile_mask=mask))


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
  """(torch oracle, our NVLMD, params, its jitted forward) loaded from the transformers hub layout."""
  model = build_torch_internvl(seed=5)
  directory = rm.save(model, tmp_path_factory.mktemp("internvl_e2e"), max_shard_size="100KB")
  ours, params = load_pretrained(directory)
  return model, ours, params, forward(ours)


E2E_LENGTH, E2E_TILES = 320, 3  # 2 regular tiles + thumbnail


def test_logits_match_transformers_two_tiles_and_thumbnail(internvl):
  model, ours, params, run = internvl
  assert isinstance(ours, NVLMD) and ours.config.tokens_per_tile == 16
  tiles = tiles_of(E2E_TILES, seed=0)
  ids = multimodal_prompt(E2E_TILES, 16, length=E2E_LENGTH, seed=0)
  logits = run(params, jnp.asarray(ids[None]), jnp.asarray(tiles[None]), jnp.ones((1, E2E_TILES), bool))
  ref = torch_logits(model, ids[None], tiles)
  diff = float(np.max(np.abs(np.asarray(logits) - ref)))
  print(f"NVLM-D vs transformers InternVL, 320 tokens, 3 tiles: max abs logit diff {diff:.2e}")
  assert diff <= ATOL


def test_batch_with_padded_tiles_matches_per_row_reference(internvl):
  model, ours, params, run = internvl
  max_tiles = 4
  counts = [3, 1]
  rows = [multimodal_prompt(n, 16, length=200, seed=10 + b, start=5 + 20 * b) for b, n in enumerate(counts)]
  tiles = [tiles_of(n, seed=20 + b) for b, n in enumerate(counts)]
  pixels = np.full((2, max_tiles, 56, 56, 3), 7.0, np.float32)  # padded slots hold garbage
  mask = np.zeros((2, max_tiles), bool)
  for b, t in enumerate(tiles):
    pixels[b, : len(t)] = t
    mask[b, : len(t)] = True
  logits = np.asarray(run(params, jnp.asarray(np.stack(rows)), jnp.asarray(pixels), jnp.asarray(mask)))
  for b in range(2):
    ref = torch_logits(model, rows[b][None], tiles[b])
    assert np.max(np.abs(logits[b] - ref[0])) <= ATOL


def test_prefill_with_images_then_decode_text_matches_full_forward(internvl):
  _, ours, params, run = internvl
  ids = multimodal_prompt(E2E_TILES, 16, length=E2E_LENGTH, seed=3)
  tiles = jnp.asarray(tiles_of(E2E_TILES, seed=3)[None])
  mask = jnp.ones((1, E2E_TILES), bool)
  full = np.asarray(run(params, jnp.asarray(ids[None]), tiles, mask))  # same shapes as above: no recompile
  steps = 5
  prompt = E2E_LENGTH - steps
  cache = ours.init_cache(1, E2E_LENGTH)
  prefill = jax.jit(lambda p, x, px, c: ours.apply({"params": p}, x, pixel_values=px, tile_mask=mask, cache=c))
  decode = jax.jit(lambda p, x, c: ours.apply({"params": p}, x, cache=c))
  logits, cache = prefill(params, jnp.asarray(ids[None, :prompt]), tiles, cache)
  got = [np.asarray(logits)]
  for i in range(prompt, prompt + steps):
    logits, cache = decode(params, jnp.asarray(ids[None, i : i + 1]), cache)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Merging, checks, freezing (tiny preset, random params)


def test_merge_puts_kth_valid_tile_in_kth_run():
  batch, tiles, per_tile, dim = 1, 3, 2, 4
  features = jnp.arange(batch * tiles * per_tile * dim, dtype=jnp.float32).reshape(batch, tiles, per_tile, dim) + 1
  mask = jnp.array([[True, False, True]])  # valid tiles 0 and 2
  ids = jnp.array([[5, 9, 9, 5, 9, 9, 5, 9]])  # two runs + one surplus placeholder
  embeds = -jnp.ones((1, 8, dim))
  out = np.asarray(merge_image_features(embeds, ids, features, mask, 9))
  np.testing.assert_array_equal(out[0, [1, 2]], np.asarray(features[0, 0]))
  np.testing.assert_array_equal(out[0, [4, 5]], np.asarray(features[0, 2]))
  np.testing.assert_array_equal(out[0, [0, 3, 6, 7]], -1.0)  # text and the surplus placeholder keep theirs


@pytest.fixture(scope="module")
def tiny():
  model = NVLMD(get_preset("tiny_nvlm_d"))
  params = random_params(model, jnp.zeros((1, 4), jnp.int32), seed=1)
  return model, params


def test_init_without_pixels_creates_vision_params_and_cache_is_unbound(tiny):
  model, params = tiny
  assert set(params) == {"vision_model", "projector", "language_model"}
  cache = model.init_cache(2, 64)
  assert cache["layers"]["k"].shape == (2, 2, 64, 2, 16)


def test_placeholder_count_mismatch_is_reported(tiny):
  model, params = tiny
  ids = np.full((2, 40), 3)
  ids[0, 2:18] = 255
  ids[1, 2:10] = 255  # 8 placeholders for one 16-token tile
  pixels = jnp.zeros((2, 1, 56, 56, 3))
  with pytest.raises(ValueError, match=r"row 1: 8 image placeholder tokens .* 1 valid tiles x 16 tokens = 16"):
    model.apply({"params": params}, jnp.asarray(ids), pixel_values=pixels)
  checked = NVLMD(model.config.replace(debug_checks=True))
  run = jax.jit(lambda p, x: checked.apply({"params": p}, x, pixels, method="embed_multimodal"))
  with pytest.raises(Exception, match="row 1: 8 image placeholder tokens"):
    jax.block_until_ready(run(params, jnp.asarray(ids)))


def test_freeze_vision_stops_vision_gradients_only(tiny):
  model, params = tiny
  assert model.config.freeze_vision
  ids = np.full((1, 20), 3)
  ids[0, 2:18] = 255
  pixels = jnp.asarray(tiles_of(1, seed=0)[None])
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(tree)))
  # The decoder's input embeddings: where the vision pathway meets the LLM (the decoder itself adds
  # nothing to this test but compile time).
  loss = lambda p: jnp.sum(model.apply({"params": p}, jnp.asarray(ids), pixels, method="embed_multimodal") ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert norm(grads["projector"]) > 0 and norm(grads["language_model"]["embed_tokens"]) > 0
  assert norm(grads["vision_model"]) == 0
  # Unfrozen, the pathway does send gradients into the ViT (one unrolled layer: backward compiles are slow).
  cfg = model.config
  unfrozen = NVLMD(cfg.replace(freeze_vision=False, vision=cfg.vision.replace(num_layers=1, scan_layers=False)))
  unfrozen_params = random_params(unfrozen, jnp.zeros((1, 4), jnp.int32), seed=2)
  features = lambda p: jnp.sum(unfrozen.apply({"params": p}, pixels, method="encode_images") ** 2)
  assert norm(jax.jit(jax.grad(features))(unfrozen_params)["vision_model"]) > 0


def test_tile_budget_gives_the_same_logits(tiny):
  model, params = tiny
  ids = np.full((2, 60), 3)
  ids[0, 2:34] = 255
  ids[1, 40:56] = 255
  pixels = jnp.asarray(np.stack([tiles_of(3, 0), tiles_of(3, 1)]))
  mask = jnp.array([[True, False, True], [False, True, False]])
  run = jax.jit(
    lambda p, budget: model.apply(
      {"params": p}, jnp.asarray(ids), pixel_values=pixels, tile_mask=mask, tile_budget=budget
    ),
    static_argnums=1,
  )
  np.testing.assert_allclose(np.asarray(run(params, 3)), np.asarray(run(params, None)), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# NVLM-D-72B checkpoint layout (docs/paper.md (h)), written with safetensors directly


def nvlm_d_release_tensors(
  model,
  *,
  stored_heads: int,
  norm_fill: tuple[float, float] = (0.0, 0.0),
  projector=("layer_norm", "linear_1", "linear_2"),
) -> dict:
  """A transformers InternVL's weights under NVLM-D-72B names: fused qkv, dummy heads padded in (zero rows; the
  q/k-norm dummy part filled with `norm_fill`, which cannot change the output), mlp1, bf16. `projector` names the
  LayerNorm and the two Linears of the model's projector (transformers' names, or a Sequential's "0", "1", "3")."""
  sd = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
  vit = model.config.vision_config
  vt, width = "model.vision_tower.", stored_heads * vit.hidden_size // vit.num_attention_heads

  def pad_rows(w, fill=0.0):
    return torch.cat([w, torch.full((width - w.shape[0],) + tuple(w.shape[1:]), fill, dtype=w.dtype)])

  out = {
    "vision_model.embeddings.class_embedding": sd[f"{vt}embeddings.cls_token"],
    "vision_model.embeddings.patch_embedding.weight": sd[f"{vt}embeddings.patch_embeddings.projection.weight"],
    "vision_model.embeddings.patch_embedding.bias": sd[f"{vt}embeddings.patch_embeddings.projection.bias"],
    "vision_model.embeddings.position_embedding": sd[f"{vt}embeddings.position_embeddings"],
  }
  for i in range(vit.num_hidden_layers):
    src, dst = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
    out.update(
      {
        f"{dst}attn.qkv.weight": torch.cat([pad_rows(sd[f"{src}attention.{x}_proj.weight"]) for x in "qkv"]),
        f"{dst}attn.q_norm.weight": pad_rows(sd[f"{src}attention.q_norm.weight"], norm_fill[0]),
        f"{dst}attn.k_norm.weight": pad_rows(sd[f"{src}attention.k_norm.weight"], norm_fill[1]),
        f"{dst}attn.proj.weight": pad_rows(sd[f"{src}attention.projection_layer.weight"].T).T.contiguous(),
        f"{dst}attn.proj.bias": sd[f"{src}attention.projection_layer.bias"],
        f"{dst}ls1": sd[f"{src}lambda_1"],
        f"{dst}ls2": sd[f"{src}lambda_2"],
        f"{dst}norm1.weight": sd[f"{src}layernorm_before.weight"],
        f"{dst}norm2.weight": sd[f"{src}layernorm_after.weight"],
        **{f"{dst}mlp.{n}.{p}": sd[f"{src}mlp.{n}.{p}"] for n in ("fc1", "fc2") for p in ("weight", "bias")},
      }
    )
  proj, (norm, first, second) = "model.multi_modal_projector.", projector
  out.update(
    {
      "mlp1.0.weight": sd[f"{proj}{norm}.weight"],
      "mlp1.0.bias": sd[f"{proj}{norm}.bias"],
      "mlp1.1.weight": sd[f"{proj}{first}.weight"],
      "mlp1.3.weight": sd[f"{proj}{second}.weight"],
    }
  )
  for k, v in sd.items():
    if k.startswith("model.language_model."):
      out["language_model.model." + k[len("model.language_model.") :]] = v
  out["language_model.lm_head.weight"] = sd["lm_head.weight"]
  return out


def write_nvlm_d_checkpoint(model, directory, *, stored_heads: int, poison: tuple[str, int] | None = None):
  """The torch model's weights under NVLM-D-72B names (nvlm_d_release_tensors), in two shards with an index."""
  out = nvlm_d_release_tensors(model, stored_heads=stored_heads)
  if poison is not None:
    key, row = poison
    out[key] = out[key].clone()
    out[key][row] = 0.5
  names = sorted(out)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    tensors = {k: out[k].contiguous() for k in keys}
    safetensors.torch.save_file(tensors, str(directory / file), metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  text = model.config.text_config.to_dict()
  llm_config = {
    k: text[k]
    for k in (
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "rms_norm_eps",
      "max_position_embeddings",
      "vocab_size",
    )
  }
  llm_config.update(
    architectures=["Qwen2ForCausalLM"],
    model_type="llama",
    attention_bias=True,
    hidden_act="silu",
    rope_theta=text["rope_parameters"]["rope_theta"],
    tie_word_embeddings=False,
  )
  vision_config = {
    "architectures": ["InternVisionModel"],
    "model_type": "intern_vit_6b",
    "hidden_act": "gelu",
    "hidden_size": TINY_VISION["hidden_size"],
    "num_hidden_layers": TINY_VISION["num_hidden_layers"],
    "num_attention_heads": TINY_VISION["num_attention_heads"],
    "intermediate_size": TINY_VISION["intermediate_size"],
    "image_size": 56,
    "patch_size": 7,
    "qk_normalization": True,
    "qkv_bias": False,
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
  }
  config = {
    "architectures": ["NVLM_D"],
    "downsample_ratio": 0.5,
    "force_image_size": 56,
    "dynamic_image_size": True,
    "ps_version": "v2",
    "select_layer": -1,
    "use_thumbnail": True,
    "max_dynamic_patch": 6,
    "llm_config": llm_config,
    "vision_config": vision_config,
  }
  (directory / "config.json").write_text(json.dumps(config))
  tokenizer_config = {"added_tokens_decoder": {str(IMAGE_TOKEN): {"content": "<|vision_pad|>", "special": True}}}
  (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  return directory


@pytest.fixture(scope="module")
def nvlm_d_oracle():
  """An InternVL model that computes NVLM-D: bias-free projector of width = LLM intermediate size,
  weights rounded to bf16 (the storage dtype)."""
  model = build_torch_internvl(seed=7, intermediate_size=rm.TINY_TEXT["hidden_size"])
  with torch.no_grad():
    for name in ("linear_1", "linear_2"):
      getattr(model.model.multi_modal_projector, name).bias.zero_()
    for p in model.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  return model


def test_nvlm_d_72b_layout_imports_and_matches(nvlm_d_oracle, tmp_path):
  directory = write_nvlm_d_checkpoint(nvlm_d_oracle, tmp_path, stored_heads=8)  # 4 real + 4 zero dummy heads
  ours, params = load_pretrained(directory)
  cfg = ours.config
  assert isinstance(ours, NVLMD)
  assert (cfg.image_token_id, cfg.vision.num_heads, cfg.projector.use_bias) == (IMAGE_TOKEN, 4, False)
  assert params["vision_model"]["encoder"]["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 32, 4, 8)
  ids = multimodal_prompt(3, 16, length=300, seed=4)
  tiles = tiles_of(3, seed=4)
  logits = forward(ours)(params, jnp.asarray(ids[None]), jnp.asarray(tiles[None]), jnp.ones((1, 3), bool))
  diff = float(np.max(np.abs(np.asarray(logits) - torch_logits(nvlm_d_oracle, ids[None], tiles))))
  print(f"NVLM-D-72B layout (bf16 file, padded heads) vs oracle: max abs logit diff {diff:.2e}")
  assert diff <= ATOL
  # Export writes the padded layout back, bit for bit.
  ckpt = SafetensorsCheckpoint(directory)
  table = vision_layouts.nvlm_d_rules(cfg)
  exported = dict(table.to_hf(params))
  assert set(exported) == set(ckpt)
  for key in (
    "vision_model.encoder.layers.2.attn.qkv.weight",
    "vision_model.encoder.layers.0.attn.proj.weight",
    "vision_model.encoder.layers.1.attn.k_norm.weight",
    "mlp1.3.weight",
  ):
    np.testing.assert_array_equal(exported[key].astype(np.float32), ckpt.read(key).astype(np.float32))


def test_nvlm_d_layout_refuses_nonzero_dummy_heads(nvlm_d_oracle, tmp_path):
  key = "vision_model.encoder.layers.1.attn.qkv.weight"
  directory = write_nvlm_d_checkpoint(nvlm_d_oracle, tmp_path, stored_heads=8, poison=(key, 64 + 40))  # a k dummy row
  with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.1\.attn\.qkv\.weight.*k heads 4\.\.7"):
    load_pretrained(directory)


# ----------------------------------------------------------------------------------------------------
# Presets and config checks


def test_get_preset_names_the_choices():
  with pytest.raises(KeyError, match="nvlm_d_72b"):
    get_preset("nvlm_d_70b")
  assert get_preset("tiny_nvlm_d", freeze_vision=False).freeze_vision is False
  assert {
    "nvlm_d_72b",
    "nvlm_d_34b",
    "tiny_nvlm_d",
    "qwen2_72b_instruct",
    "nous_hermes_2_yi_34b",
    "internvit_6b_448px_v1_5",
    "tiny_vit",
    "tiny_llm",
  } <= set(PRESETS)


def test_nvlm_config_checks_projector_widths():
  cfg = get_preset("tiny_nvlm_d")
  with pytest.raises(ValueError, match="in_features"):
    cfg.replace(projector=ProjectorConfig(in_features=64, hidden_size=96, out_features=64))
  with pytest.raises(ValueError, match="llm.hidden_size"):
    cfg.replace(projector=ProjectorConfig(in_features=128, hidden_size=96, out_features=32))
  assert isinstance(cfg, NVLMConfig) and cfg.tokens_per_tile == 16 and cfg.max_tiles_per_image == 7


def param_count(cfg) -> int:
  shapes = jax.eval_shape(lambda: NVLMD(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_full_size_parameter_counts():
  # Spec h: 79,379,593,344 with the padded ViT; 78,863,416,704 with its 25 real heads (we slice the dummies).
  assert param_count(get_preset("nvlm_d_72b")) == 78_863_416_704
  assert param_count(get_preset("nvlm_d_34b")) == 40_334_383_488


def test_sharded_forward_equals_single_device(tiny):
  """fsdp x tensor mesh of 8 virtual devices: every vision/projector param carries logical axes the
  rules table can place, and the sharded model computes the same logits."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS before jax loads)")
  model, params = tiny
  mesh = sharding.create_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  shardings = sharding.shardings_for(boxed, mesh)
  sharded = jax.device_put(params, shardings)
  assert sharded["projector"]["linear_1"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert sharded["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  ids = np.full((4, 40), 3)
  ids[:, 4:20] = 255
  ids[1, 20:36] = 255
  pixels = jnp.asarray(np.stack([tiles_of(2, b) for b in range(4)]))
  mask = jnp.array([[True, False], [True, True], [False, True], [True, False]])
  expected = forward(model)(params, jnp.asarray(ids), pixels, mask)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    logits = forward(model)(
      sharded, jax.device_put(jnp.asarray(ids), batch), jax.device_put(pixels, batch), jax.device_put(mask, batch)
    )
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)
