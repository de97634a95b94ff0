"""The released nvidia/NVLM-D-72B config.json, end to end.

tests/fixtures/nvlm_d_72b_config.json is a verbatim copy of the release's config.json. The test keeps every
field of it and shrinks only the sizes (widths, depths, heads, vocabulary, image and patch size, and
max_position_embeddings, so that a prompt past it is cheap): its llm_config still says model_type 'llama'
with architectures ['Qwen2ForCausalLM'], attention_bias true and dynamic RoPE scaling (factor 3). The
weights are a random transformers InternVL (the oracle: InternViT-6B-style tower, Qwen2 text model built
from that llm_config as NVLM_D_Config builds it) with its projector swapped for NVLM-D's bias-free `mlp1`,
written under the release's key names: fused qkv with the ViT heads zero-padded to a multiple of 8, dummy
q/k-norm weights that are not zero, bf16, several shards.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm
import safetensors.torch
import torch
import transformers
from PIL import Image

from nvlm_jax.checkpoint import vision_layouts
from nvlm_jax.checkpoint.safetensors_io import CheckpointError
from nvlm_jax.checkpoint.text_layouts import ConfigError, decoder_config_from_hf
from nvlm_jax.config import RopeScaling
from nvlm_jax.fusion.nvlm_d import NVLMD
from nvlm_jax.models import load_pretrained
from nvlm_jax.presets import get_preset
from nvlm_jax.processing.processor import Processor
from nvlm_jax.processing.tokenizer import VISION_PAD, build_tiny_tokenizer
from test_nvlm_d import nvlm_d_release_tensors

RELEASED = Path(__file__).parent / "fixtures" / "nvlm_d_72b_config.json"
ATOL = 1e-4
VOCAB = 420  # the tiny tokenizer's
MAX_POSITIONS = 128
# The only fields changed: sizes.
LLM_SIZES = dict(
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  vocab_size=VOCAB,
  max_position_embeddings=MAX_POSITIONS,
)
VIT_SIZES = dict(
  hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=5, image_size=56, patch_size=7
)
TOP_SIZES = dict(force_image_size=56)
STORED_HEADS = 8  # 5 real heads padded to a multiple of 8, as 25 -> 32 in the release


def released_config() -> dict:
  return json.loads(RELEASED.read_text())


def shrunk_config() -> dict:
  config = released_config()
  config.update(TOP_SIZES)
  config["llm_config"].update(LLM_SIZES)
  config["vision_config"].update(VIT_SIZES)
  return config


def build_oracle(config: dict, seed: int = 11):
  """transformers InternVL computing NVLM-D for this config, fp32, weights rounded to bf16 (the file dtype)."""
  vit = config["vision_config"]
  vision = transformers.InternVLVisionConfig(
    hidden_size=vit["hidden_size"],
    num_hidden_layers=vit["num_hidden_layers"],
    num_attention_heads=vit["num_attention_heads"],
    intermediate_size=vit["intermediate_size"],
    image_size=vit["image_size"],
    patch_size=vit["patch_size"],
    layer_norm_eps=vit["layer_norm_eps"],
    use_qk_norm=vit["qk_normalization"],
    norm_type=vit["norm_type"],
    attention_bias=vit["qkv_bias"],
    use_mean_pooling=True,
  )
  llm = {k: v for k, v in config["llm_config"].items() if k != "model_type"}
  text = transformers.Qwen2Config(**llm)  # NVLM_D_Config: Qwen2Config(**llm_config)
  internvl = transformers.InternVLConfig(
    vision_config=vision.to_dict(),
    text_config=text,
    image_token_id=0,
    downsample_ratio=config["downsample_ratio"],
    tie_word_embeddings=False,
  )
  torch.manual_seed(seed)
  model = transformers.InternVLForConditionalGeneration(internvl)
  width_in = vit["hidden_size"] * 4
  model.model.multi_modal_projector = torch.nn.Sequential(  # NVLM-D's mlp1 (no linear biases)
    torch.nn.LayerNorm(width_in),
    torch.nn.Linear(width_in, llm["intermediate_size"], bias=False),
    torch.nn.GELU(),
    torch.nn.Linear(llm["intermediate_size"], llm["hidden_size"], bias=False),
  )
  for sub in (model.config, model.config.vision_config, model.config.text_config):
    sub._attn_implementation = "eager"
  model = rm.randomize_(model.to(torch.float32), seed)  # llm_config's torch_dtype is bfloat16: compare in fp32
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  return model.eval()


def released_tensors(model, config: dict) -> dict[str, torch.Tensor]:
  """The oracle's weights under the release's names, bf16, ViT heads padded to STORED_HEADS. The dummy part of the
  q/k-norm weights is not zero (it cannot change the output): the importer drops it."""
  assert model.config.vision_config.num_hidden_layers == config["vision_config"]["num_hidden_layers"]
  return nvlm_d_release_tensors(model, stored_heads=STORED_HEADS, norm_fill=(1.0, -0.25), projector=("0", "1", "3"))


def write_directory(
  directory: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer_dir: Path, shards: int = 4
) -> Path:
  names = sorted(tensors)
  files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
  for file, keys in files.items():
    safetensors.torch.save_file(
      {k: tensors[k].contiguous() for k in keys}, str(directory / file), metadata={"format": "pt"}
    )
  index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  (directory / "config.json").write_text(json.dumps(config, indent=2))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
  return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tokenizer")
  build_tiny_tokenizer(None, vocab_size=VOCAB, out_dir=directory)
  return directory


@pytest.fixture(scope="module")
def released(tmp_path_factory, tokenizer_dir):
  """(oracle, checkpoint directory, our model, params, processor)."""
  config = shrunk_config()
  oracle = build_oracle(config)
  directory = write_directory(
    tmp_path_factory.mktemp("nvlm_d_72b_shrunk"), released_tensors(oracle, config), config, tokenizer_dir
  )
  ours, params = load_pretrained(directory)
  processor = Processor.from_pretrained(directory)
  oracle.config.image_token_id = processor.tokenizer.token_to_id(VISION_PAD)
  return oracle, directory, ours, params, processor


def test_fixture_is_the_release_with_only_sizes_changed():
  original, shrunk = released_config(), shrunk_config()
  assert original["llm_config"]["rope_scaling"] == {"factor": 3.0, "type": "dynamic"}
  assert original["llm_config"]["model_type"] == "llama" and original["llm_config"]["attention_bias"] is True
  for section, sizes in ((None, TOP_SIZES), ("llm_config", LLM_SIZES), ("vision_config", VIT_SIZES)):
    a = original if section is None else original[section]
    b = shrunk if section is None else shrunk[section]
    changed = {k for k in a if a[k] != b[k] and not isinstance(a[k], dict)}
    assert set(a) == set(b) and changed == set(sizes)


def test_config_builds_the_release_architecture(released):
  _, _, ours, params, processor = released
  cfg = ours.config
  assert isinstance(ours, NVLMD)
  assert cfg.llm.qkv_bias and cfg.llm.rope_theta == 1e6 and cfg.llm.max_position_embeddings == MAX_POSITIONS
  assert cfg.llm.rope_scaling == RopeScaling("dynamic", factor=3.0)
  assert (cfg.vision.num_heads, cfg.vision.select_layer, cfg.ps_version, cfg.max_tiles) == (5, -1, "v2", 6)
  assert not cfg.projector.use_bias and cfg.projector.hidden_size == LLM_SIZES["intermediate_size"]
  assert params["vision_model"]["encoder"]["layers"]["attn"]["q_norm"]["scale"].shape == (2, 5, 8)
  assert cfg.image_token_id == processor.tokenizer.token_to_id(VISION_PAD)
  assert (processor.image_size, processor.tokens_per_tile, processor.max_tiles_per_image) == (56, 16, 6)
  assert processor.chat_format == "chatml" and processor.global_tile_tag == "<tile_global_thumbnail>"


def image(seed: int) -> Image.Image:
  pixels = np.random.default_rng(seed).integers(0, 256, size=(60, 130, 3), dtype=np.uint8)
  return Image.fromarray(pixels)


@pytest.mark.parametrize("words", [4, 60], ids=["below_max_positions", "above_max_positions"])
def test_logits_match_transformers(released, words):
  oracle, _, ours, params, processor = released
  question = " ".join(["describe the picture"] * (words // 3 + 1))
  batch = processor([{"role": "user", "content": f"<image>\n{question}"}], [image(words)], add_generation_prompt=True)
  ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["tile_mask"]
  length = ids.shape[1]
  assert (length < MAX_POSITIONS) == (words == 4), length
  logits = jax.jit(lambda p, i, x, m: ours.apply({"params": p}, i, pixel_values=x, tile_mask=m))(
    params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)
  )
  tiles = torch.as_tensor(np.asarray(pixels)[0][np.asarray(mask)[0]]).permute(0, 3, 1, 2)
  with torch.no_grad():
    expected = oracle(
      input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long), pixel_values=tiles, use_cache=False
    ).logits.numpy()
  diff = float(np.max(np.abs(np.asarray(logits) - expected)))
  print(
    f"released NVLM-D-72B config (shrunk), {length} tokens, {int(mask.sum())} tiles, max_position_embeddings "
    f"{MAX_POSITIONS}: max abs logit diff {diff:.2e}"
  )
  assert diff <= ATOL


def test_dummy_slices_that_would_change_the_output_are_refused(released, tmp_path, tokenizer_dir):
  oracle, directory, _, _, _ = released
  config = shrunk_config()
  tensors = released_tensors(oracle, config)
  for key, index, what in (
    ("vision_model.encoder.layers.1.attn.qkv.weight", (64 + 45,), r"rows \[104:128\] \(k heads 5\.\.7\)"),
    ("vision_model.encoder.layers.0.attn.proj.weight", (slice(None), 45), r"columns \[40:64\]"),
  ):
    broken = {**tensors, key: tensors[key].clone()}
    broken[key][index] = 0.5
    target = tmp_path / key.split(".")[-2]
    target.mkdir()
    write_directory(target, broken, config, tokenizer_dir)
    with pytest.raises(CheckpointError, match=rf"{key.replace('.', '[.]')}: the dummy-head slice {what} is not zero"):
      load_pretrained(target)


def test_architecture_wins_over_model_type():
  llm = {**released_config()["llm_config"], **LLM_SIZES}
  assert decoder_config_from_hf(llm).qkv_bias  # Qwen2ForCausalLM with model_type 'llama': q/k/v biases
  assert not decoder_config_from_hf({**llm, "architectures": ["LlamaForCausalLM"], "attention_bias": False}).qkv_bias
  with pytest.raises(ConfigError, match="'attention_bias' is true; Llama then also has an o_proj bias"):
    decoder_config_from_hf({**llm, "architectures": ["LlamaForCausalLM"]})


def test_fields_that_contradict_the_weights_name_the_field_and_the_tensor(released, tmp_path, tokenizer_dir):
  oracle, _, _, _, _ = released
  config = shrunk_config()
  config["llm_config"] = {**config["llm_config"], "architectures": ["LlamaForCausalLM"], "attention_bias": False}
  write_directory(tmp_path, released_tensors(oracle, config), config, tokenizer_dir)
  with pytest.raises(
    ConfigError,
    match=r"config\.json: fields 'architectures' / 'model_type' / 'attention_bias' build "
    r"a Llama decoder .* hold 'language_model\.model\.layers\.0\.self_attn\.q_proj\.bias'",
  ):
    load_pretrained(tmp_path)


def test_nvlm_d_72b_preset_is_the_released_config():
  """The full-size preset and the released config.json describe the same model (architecture fields)."""
  parsed = vision_layouts.nvlm_config_from_nvlm_d(released_config(), source=str(RELEASED))
  preset = get_preset("nvlm_d_72b")
  implementation = {"dtype", "param_dtype", "scan_layers", "remat_policy", "causal_block_size", "pad_token_id"}
  for sub in ("llm", "vision", "projector"):
    a, b = dataclasses.asdict(getattr(parsed, sub)), dataclasses.asdict(getattr(preset, sub))
    assert {k: v for k, v in a.items() if k not in implementation} == {
      k: v for k, v in b.items() if k not in implementation
    }, sub
  assert preset.llm.rope_scaling == RopeScaling("dynamic", factor=3.0)
  assert (parsed.max_tiles, parsed.use_thumbnail, parsed.ps_version, parsed.downsample_ratio) == (
    preset.max_tiles,
    preset.use_thumbnail,
    preset.ps_version,
    preset.downsample_ratio,
  )
