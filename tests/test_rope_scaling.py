"""RoPE scaling (default, linear, dynamic NTK, llama3, yarn) against transformers: its rope init functions,
tiny Qwen2 / Llama models at prompt lengths below and above max_position_embeddings, and cached
generation (dynamic NTK re-derives its base at every decode step), plus the config round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import nvlm_jax
from nvlm_jax.checkpoint.convert import configs as convert_configs
from nvlm_jax.checkpoint.text_layouts import ConfigError, decoder_config_from_hf
from nvlm_jax.config import RopeScaling
from nvlm_jax.layers.rope import RotaryEmbedding

TOL = 1e-4
MAX_POSITIONS = 64  # small, so "above max_position_embeddings" is a cheap prompt
SHORT, LONG = 48, 160

# name -> (family, rope dict as a config.json holds it, max_position_embeddings)
SCALINGS = {
  "dynamic_qwen2": ("qwen2", {"type": "dynamic", "factor": 3.0}, MAX_POSITIONS),  # NVLM-D-72B's llm_config
  "linear_qwen2": ("qwen2", {"rope_type": "linear", "factor": 2.5}, MAX_POSITIONS),
  "llama3": (
    "llama",
    {
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
    256,
  ),
  "yarn": (
    "llama",
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0},
    256,
  ),
}


def hf_config(family: str, rope: dict, max_positions: int, **overrides):
  make = rm.tiny_qwen2_config if family == "qwen2" else rm.tiny_llama_config
  return make(rope_scaling=dict(rope), max_position_embeddings=max_positions, rope_theta=1e4, **overrides)


def ours_for(config) -> RotaryEmbedding:
  cfg = decoder_config_from_hf(config.to_dict())
  return RotaryEmbedding(cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)


# ----------------------------------------------------------------------------------------------------
# Frequencies against transformers' rope init functions


@pytest.mark.parametrize(
  "rope",
  [
    {"rope_type": "linear", "factor": 4.0},
    {
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {
      "rope_type": "yarn",
      "factor": 8.0,
      "original_max_position_embeddings": 32,
      "beta_fast": 8.0,
      "beta_slow": 2.0,
      "mscale": 0.7,
      "mscale_all_dim": 1.0,
      "truncate": False,
    },
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "attention_factor": 1.3},
  ],
  ids=["linear", "llama3", "yarn", "yarn_mscale_untruncated", "yarn_attention_factor"],
)
def test_static_frequencies_equal_transformers(rope):
  config = hf_config("llama", rope, 256, head_dim=32)
  expected, expected_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
  inv_freq, scale = ours_for(config).inverse_frequencies(32, jnp.zeros((1, 4), jnp.int32))
  np.testing.assert_allclose(np.asarray(inv_freq), expected.numpy(), rtol=1e-6, atol=0)
  assert scale == pytest.approx(expected_scale, rel=1e-7)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200, 1000])
def test_dynamic_ntk_frequencies_follow_the_traced_length(length):
  config = hf_config("qwen2", {"type": "dynamic", "factor": 3.0}, MAX_POSITIONS)
  expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=torch.tensor(length))
  rope = ours_for(config)
  positions = jnp.arange(length, dtype=jnp.int32)[None]
  inv_freq, _ = jax.jit(lambda p: rope.inverse_frequencies(16, p))(positions)  # length is traced, not static
  np.testing.assert_allclose(np.asarray(inv_freq), expected.numpy(), rtol=1e-6, atol=0)
  if length <= MAX_POSITIONS:  # identical to unscaled RoPE up to max_position_embeddings
    plain, _ = RotaryEmbedding(1e4).inverse_frequencies(16, positions)
    np.testing.assert_allclose(np.asarray(inv_freq), np.asarray(plain), rtol=1e-6, atol=0)  # base exactly theta


# ----------------------------------------------------------------------------------------------------
# Whole models (load_pretrained of a transformers save_pretrained directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name -> (torch reference, our model, our params)."""
  out = {}
  for seed, (name, (family, rope, max_positions)) in enumerate(SCALINGS.items()):
    reference = rm.build_causal_lm(hf_config(family, rope, max_positions), seed=seed)
    directory = rm.save(reference, tmp_path_factory.mktemp(name))
    model, params = nvlm_jax.load_pretrained(directory)
    out[name] = (reference, model, params)
  return out


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_logits_match_transformers_below_and_above_max_positions(models, name):
  reference, model, params = models[name]
  assert model.config.rope_scaling.rope_type == name.split("_")[0]
  run = jax.jit(lambda p, x: model.apply({"params": p}, x))
  for length in (SHORT, LONG):
    tokens = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (1, length), seed=length)
    diff = float(np.max(np.abs(np.asarray(run(params, jnp.asarray(tokens))) - rm.torch_logits(reference, tokens))))
    print(
      f"{name}: {length} tokens (max_position_embeddings {model.config.max_position_embeddings}): "
      f"max abs logit diff {diff:.2e}"
    )
    assert diff <= TOL


def reference_steps(reference, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """transformers greedy generate from a fresh copy of the model (dynamic RoPE keeps state between calls):
  (generated tokens, logits of every step [new_tokens, V])."""
  fresh = type(reference)(reference.config).eval()
  fresh.load_state_dict(reference.state_dict())
  ids = torch.as_tensor(prompt[None], dtype=torch.long)
  with torch.no_grad():
    out = fresh.generate(
      ids,
      attention_mask=torch.ones_like(ids),
      max_new_tokens=new_tokens,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
      output_logits=True,
      return_dict_in_generate=True,
    )
  return out.sequences[0, len(prompt) :].numpy(), torch.cat(out.logits).float().numpy()


@pytest.mark.parametrize("prompt_length", [MAX_POSITIONS - 8, MAX_POSITIONS + 40], ids=["crosses", "above"])
def test_dynamic_ntk_cached_generation_matches_transformers(models, prompt_length):
  """Each decode step derives the NTK base from its own length, the cached keys keep theirs: the per-step
  logits (teacher-forced on transformers' tokens) and the greedy tokens of `generate` both agree."""
  reference, model, params = models["dynamic_qwen2"]
  new_tokens = 16
  prompt = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (prompt_length,), seed=prompt_length)
  tokens, expected = reference_steps(reference, prompt, new_tokens)
  cache = model.init_cache(1, prompt_length + new_tokens)
  step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c, logits_to_keep=1))
  logits, cache = step(params, jnp.asarray(prompt[None]), cache)
  got = [np.asarray(logits[0, -1])]
  for token in tokens[:-1]:
    logits, cache = step(params, jnp.asarray([[token]], jnp.int32), cache)
    got.append(np.asarray(logits[0, -1]))
  diff = float(np.max(np.abs(np.stack(got) - expected)))
  print(
    f"dynamic NTK generation, prompt {prompt_length} + {new_tokens} (max_position_embeddings {MAX_POSITIONS}): "
    f"max abs step-logit diff {diff:.2e}"
  )
  assert diff <= TOL
  ours = nvlm_jax.generate(model, params, prompt[None], max_new_tokens=new_tokens, eos_token_id=[])
  np.testing.assert_array_equal(np.asarray(ours[0]), tokens)


# ----------------------------------------------------------------------------------------------------
# Config parsing and export


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_export_writes_the_scaling_back(models, name):
  _, model, _ = models[name]
  family = SCALINGS[name][0]
  written = convert_configs.decoder_config_json(model.config, family, "float32")
  assert written["rope_parameters"]["rope_type"] == model.config.rope_scaling.rope_type
  assert written["rope_scaling"]["type"] == written["rope_scaling"]["rope_type"] == model.config.rope_scaling.rope_type
  assert decoder_config_from_hf(written) == model.config.replace(scan_layers=True)
  theirs = (transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig)(**written)
  ours = ours_for(theirs)
  assert ours.scaling == model.config.rope_scaling


def test_both_key_spellings_and_both_fields():
  base = dict(
    model_type="llama",
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=8,
    max_position_embeddings=128,
  )
  old = decoder_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
  new = decoder_config_from_hf({**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}})
  assert old == new and old.rope_scaling == RopeScaling("dynamic", factor=2.0) and old.rope_theta == 5e5
  with pytest.raises(ConfigError, match=r"config\.json: field 'rope_scaling' asks for RoPE scaling type 'longrope'"):
    decoder_config_from_hf({**base, "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}})
  with pytest.raises(ConfigError, match=r"field 'rope_scaling' .*'llama3' needs \['low_freq_factor'"):
    decoder_config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  with pytest.raises(ConfigError, match=r"field 'rope_parameters' .*'linear' needs \['factor'\]"):
    decoder_config_from_hf({**base, "rope_parameters": {"rope_type": "linear"}})
