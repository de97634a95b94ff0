"""The shared vision pathway: pixel shuffle, InternViT, projector, encode_images.

Oracles: a torch transcription of docs/paper.md c.1 (the three view/permute steps) for pixel shuffle, and tiny
random transformers `InternVLVisionModel` / `InternVLForConditionalGeneration.get_image_features` in fp32.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm
import torch
import transformers

from nvlm_jax.checkpoint import vision_layouts  # also registers the vision layouts
from nvlm_jax.checkpoint.safetensors_io import save_sharded
from nvlm_jax.config import VisionConfig
from nvlm_jax.fusion.nvlm_d import NVLMD
from nvlm_jax.models import load_pretrained
from nvlm_jax.presets import get_preset
from nvlm_jax.vision.intern_vit import InternViT
from nvlm_jax.vision.pathway import encode_images
from nvlm_jax.vision.pixel_shuffle import pixel_shuffle

ATOL = 1e-5


def random_params(model: nn.Module, *init_args, seed: int = 0, std: float = 0.05) -> dict:
  """Seeded random params with the model's shapes, without compiling its init (slow on CPU).

  Norm scales and layer scales are 1 + noise, everything else N(0, std).
  """
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args))["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = "/".join(str(getattr(k, "key", k)) for k in path)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if names.endswith("scale") or "/ls" in names:
      return jnp.asarray(1.0 + 0.1 * noise, leaf.dtype)
    return jnp.asarray(std * noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------------------------------
# Pixel shuffle


def torch_pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
  """Spec c.1, step by step: [N, g*g, C] -> [N, (g*s)^2, C/s^2]."""
  n, tokens, c = x.shape
  g = int(tokens**0.5)
  x = x.reshape(n, g, g, c)
  x = x.view(n, g, int(g * scale), int(c / scale))  # merge column pairs
  x = x.permute(0, 2, 1, 3).contiguous()
  x = x.view(n, int(g * scale), int(g * scale), int(c / (scale * scale)))  # merge row pairs
  if version == "v2":
    x = x.permute(0, 2, 1, 3).contiguous()
  return x.reshape(n, -1, x.shape[-1])


@pytest.mark.parametrize("grid,channels", [(4, 3), (8, 5), (32, 2)])
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_pixel_shuffle_matches_torch(grid, channels, version):
  x = np.random.default_rng(grid).standard_normal((2, grid * grid, channels)).astype(np.float32)
  ours = np.asarray(pixel_shuffle(jnp.asarray(x), 0.5, version))
  ref = torch_pixel_shuffle(torch.as_tensor(x), 0.5, version).numpy()
  assert ours.shape == (2, grid * grid // 4, 4 * channels)
  np.testing.assert_array_equal(ours, ref)


def test_pixel_shuffle_closed_form():
  g, c = 8, 3
  x = np.random.default_rng(0).standard_normal((1, g * g, c)).astype(np.float32)
  out = np.asarray(pixel_shuffle(jnp.asarray(x)))
  big = g // 2
  for r in range(big):
    for col in range(big):
      for dr in range(2):
        for dc in range(2):
          np.testing.assert_array_equal(
            out[0, r * big + col, (dr * 2 + dc) * c : (dr * 2 + dc + 1) * c], x[0, (2 * r + dr) * g + (2 * col + dc)]
          )


def test_pixel_shuffle_rejects_bad_grids():
  with pytest.raises(ValueError, match="square"):
    pixel_shuffle(jnp.zeros((1, 12, 4)))
  with pytest.raises(ValueError, match="not divisible"):
    pixel_shuffle(jnp.zeros((1, 9, 4)))
  with pytest.raises(ValueError, match="1/k"):
    pixel_shuffle(jnp.zeros((1, 16, 4)), scale=0.3)


# ----------------------------------------------------------------------------------------------------
# InternViT vs transformers InternVLVisionModel

TINY_VISION = dict(
  hidden_size=32,
  num_hidden_layers=3,
  num_attention_heads=4,
  intermediate_size=64,
  image_size=56,
  patch_size=7,
  layer_norm_eps=1e-6,
  use_mean_pooling=True,
)
# InternViT-6B style (q/k RMSNorm over the full width, no qkv bias: docs/paper.md a.1) and an InternViT-300M
# style (LayerNorm, no q/k norm, qkv bias).
VIT_STYLES = {
  "6b": dict(use_qk_norm=True, norm_type="rms_norm", attention_bias=False),
  "300m": dict(use_qk_norm=False, norm_type="layer_norm", attention_bias=True),
}


def build_torch_vit(style: str, seed: int = 0):
  config = transformers.InternVLVisionConfig(**TINY_VISION, **VIT_STYLES[style])
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.InternVLVisionModel(config)
  return rm.randomize_(model, seed).eval()


@pytest.fixture(scope="module", params=sorted(VIT_STYLES))
def torch_vit(request, tmp_path_factory):
  model = build_torch_vit(request.param)
  directory = rm.save(model, tmp_path_factory.mktemp(f"vit_{request.param}"), max_shard_size="20KB")
  return model, directory


def torch_vit_hidden(model, pixels: np.ndarray) -> list[np.ndarray]:
  with torch.no_grad():
    out = model(pixel_values=torch.as_tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("select_layer,scan_layers", [(-1, True), (-2, True), (1, True), (-1, False)])
def test_intern_vit_matches_transformers(torch_vit, select_layer, scan_layers):
  model, directory = torch_vit
  ours, params = load_pretrained(directory, scan_layers=scan_layers, config_overrides={"select_layer": select_layer})
  assert isinstance(ours, InternViT)
  pixels = np.random.default_rng(1).standard_normal((3, 56, 56, 3)).astype(np.float32)
  features = jax.jit(lambda p, x: ours.apply({"params": p}, x))(params, jnp.asarray(pixels))
  expected = torch_vit_hidden(model, pixels)[select_layer][:, 1:]  # HF hidden_states[k]; drop the class token
  assert features.shape == (3, 64, 32)
  np.testing.assert_allclose(np.asarray(features), expected, atol=ATOL, rtol=0)


def test_standalone_intern_vit_directory_round_trips(torch_vit, tmp_path):
  """Export our params in the InternVL/NVLM naming (fused qkv), then import them as an InternVisionModel dir."""
  model, directory = torch_vit
  ours, params = load_pretrained(directory)
  cfg = ours.config
  save_sharded(vision_layouts.intern_vit_rules(cfg).to_hf(params), tmp_path, max_shard_bytes=20_000)
  config = {
    "architectures": ["InternVisionModel"],
    "model_type": "intern_vit_6b",
    "hidden_act": "gelu",
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "intermediate_size": cfg.intermediate_size,
    "image_size": cfg.image_size,
    "patch_size": cfg.patch_size,
    "qk_normalization": cfg.qk_normalization,
    "qkv_bias": cfg.qkv_bias,
    "norm_type": cfg.norm_type,
    "layer_norm_eps": cfg.layer_norm_eps,
  }
  (tmp_path / "config.json").write_text(json.dumps(config))
  again, params_again = load_pretrained(tmp_path)
  assert again.config == cfg
  jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_intern_vit_params_have_logical_axes():
  cfg = get_preset("tiny_vit")
  boxed = jax.eval_shape(lambda: InternViT(cfg).init(jax.random.key(0), jnp.zeros((1, 56, 56, 3))))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert any("vision_heads" in tuple(s) for s in specs)


def test_vision_config_validation():
  with pytest.raises(ValueError, match="patch_size"):
    VisionConfig(image_size=50, patch_size=7, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=8)
  with pytest.raises(ValueError, match="select_layer"):
    VisionConfig(
      image_size=56, patch_size=7, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=8, select_layer=-4
    )
  cfg = VisionConfig(
    image_size=56, patch_size=7, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=8, select_layer=-2
  )
  assert (cfg.depth, cfg.grid_size, cfg.num_positions, cfg.head_dim) == (3, 8, 65, 8)


def test_intern_vit_rejects_wrong_tile_size():
  cfg = get_preset("tiny_vit")
  with pytest.raises(ValueError, match=r"\[N, 56, 56, 3\]"):
    InternViT(cfg).init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))


# ----------------------------------------------------------------------------------------------------
# Whole pathway (ViT -> shuffle -> projector) vs transformers get_image_features


@pytest.fixture(scope="module")
def torch_internvl(tmp_path_factory):
  vision = transformers.InternVLVisionConfig(**TINY_VISION, **VIT_STYLES["6b"])
  text = rm.tiny_qwen2_config(tie_word_embeddings=False)
  config = transformers.InternVLConfig(
    vision_config=vision.to_dict(),
    text_config=text.to_dict(),
    image_token_id=rm.TINY_TEXT["vocab_size"] - 1,
    tie_word_embeddings=False,
  )
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = transformers.InternVLForConditionalGeneration(config)
  for sub in (model.config, model.config.vision_config, model.config.text_config):
    sub._attn_implementation = "eager"
  model = rm.randomize_(model, 3).eval()
  directory = rm.save(model, tmp_path_factory.mktemp("internvl"), max_shard_size="100KB")
  ours, params = load_pretrained(directory)
  return model, ours, params


def test_encode_images_matches_transformers(torch_internvl):
  model, ours, params = torch_internvl
  pixels = np.random.default_rng(2).standard_normal((2, 3, 56, 56, 3)).astype(np.float32)
  mask = np.array([[True, True, True], [True, True, False]])
  features = jax.jit(lambda p, x, m: ours.apply({"params": p}, x, m, method="encode_images"))(
    params, jnp.asarray(pixels), jnp.asarray(mask)
  )
  assert features.shape == (2, 3, ours.config.tokens_per_tile, 64)
  with torch.no_grad():
    ref = model.get_image_features(torch.as_tensor(pixels[mask]).permute(0, 3, 1, 2)).pooler_output.numpy()
  np.testing.assert_allclose(np.asarray(features)[mask], ref, atol=ATOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(features)[~mask], 0.0)


def test_padded_tiles_never_contribute_and_tile_budget_is_exact():
  cfg = get_preset("tiny_nvlm_d")
  model = NVLMD(cfg)
  params = random_params(model, jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 4, 56, 56, 3)).astype(np.float32)
  mask = np.array([[True, False, True, False], [False, True, False, False]])
  garbage = pixels.copy()
  garbage[~mask] = 1e30  # padded slots hold anything; they must not matter
  run = jax.jit(
    lambda p, x, m, budget=None: model.apply({"params": p}, x, m, tile_budget=budget, method="encode_images"),
    static_argnums=3,
  )
  full = np.asarray(run(params, jnp.asarray(pixels), jnp.asarray(mask)))
  assert np.isfinite(full).all()
  np.testing.assert_array_equal(full[~mask], 0.0)
  np.testing.assert_allclose(np.asarray(run(params, jnp.asarray(garbage), jnp.asarray(mask))), full, atol=1e-6)
  budgeted = np.asarray(run(params, jnp.asarray(garbage), jnp.asarray(mask), 3))
  np.testing.assert_allclose(budgeted, full, atol=1e-6)


def test_encode_images_validates_shapes():
  cfg = get_preset("tiny_nvlm_d")
  vit, proj = InternViT(cfg.vision), None
  with pytest.raises(ValueError, match="batch, tiles"):
    encode_images(vit, proj, jnp.zeros((2, 56, 56, 3)))
