"""Decoding a scanned model reads its weights in place: the decode step takes per-layer views of the stacked
arrays (nvlm_jax/layer_views.py), the tokens stay those of transformers, and no weight memory is added."""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nvlm_jax
import reference_models as rm
from nvlm_jax import generation, layer_views
from nvlm_jax.layer_views import decoding_layout
from test_generation import reference_greedy
from test_nvlm_xh import CLASSES, O0, config_for, hand_batch, random_params

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """(torch reference, (scanned model, params), (unrolled model, params)) with the same random weights."""
  reference = rm.build_causal_lm(rm.tiny_qwen2_config(), seed=4)
  directory = rm.save(reference, tmp_path_factory.mktemp("qwen2"))
  return reference, nvlm_jax.load_pretrained(directory), nvlm_jax.load_pretrained(directory, scan_layers=False)


def test_views_alias_the_stacked_weights(loaded):
  _, (model, params), _ = loaded
  decode_model, views = decoding_layout(model, params)
  assert model.config.scan_layers and not decode_model.config.scan_layers
  stacks = params["decoder"]["layers"]
  layers = model.config.num_layers
  assert set(views["decoder"]) == {f"layers_{i}" for i in range(layers)}
  for i in range(layers):
    for stacked, view in zip(jax.tree.leaves(stacks), jax.tree.leaves(views["decoder"][f"layers_{i}"])):
      np.testing.assert_array_equal(np.asarray(view), np.asarray(stacked)[i])
      # the same memory: no weight is copied (every slice of this model is 64-byte aligned)
      assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + i * (stacked.nbytes // layers)
  assert views["lm_head"] is params["lm_head"] and views["embed_tokens"] is params["embed_tokens"]
  assert isinstance(params["decoder"]["layers"], dict) and "layers_0" not in params["decoder"]  # caller's untouched


def _step_hlo(model, decode_model, decode_params) -> str:
  """The compiled text of the decode step that generate's loop runs (and stream_generate calls)."""
  sampling = generation.SamplingConfig()
  _, step = generation._compiled_stream(model, decode_model, NEW_TOKENS, sampling, (), 0, ())
  cache = model.init_cache(1, 16)
  token, done = jnp.zeros((1,), jnp.int32), jnp.zeros((1,), bool)
  return step.lower(decode_params, token, cache, done, jax.random.key(0)).compile().as_text()


def test_decode_step_reads_no_weight_stack(loaded):
  """The regression guard: a decode step that receives (and so slices/copies) the stacked weights fails here."""
  _, (model, params), _ = loaded
  stacked_shapes = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(params["decoder"]["layers"])}
  stacked_shapes = {s for s in stacked_shapes if s.count(",") >= 2}  # the kernels: [L, in, out...]
  sliced = _step_hlo(model, model, params)  # the scanned module on the stacks: what generate did before
  assert any(s in sliced for s in stacked_shapes) and re.search(r"dynamic-slice", sliced)
  in_place = _step_hlo(model, *decoding_layout(model, params))
  assert not [s for s in stacked_shapes if s in in_place]


def test_scanned_unrolled_and_transformers_tokens_are_identical(loaded, monkeypatch):
  """generate and stream_generate decode a scanned model through the views, with transformers' tokens."""
  reference, (model, params), (unrolled, unrolled_params) = loaded
  layouts = []
  monkeypatch.setattr(generation, "decoding_layout", lambda m, p: layouts.append(decoding_layout(m, p)) or layouts[-1])
  prompts = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (2, 160), seed=8)
  expected = reference_greedy(reference, prompts, NEW_TOKENS)
  kwargs = dict(max_new_tokens=NEW_TOKENS, eos_token_id=[])
  scanned = np.asarray(nvlm_jax.generate(model, params, prompts, **kwargs))
  np.testing.assert_array_equal(scanned, expected)
  np.testing.assert_array_equal(np.asarray(nvlm_jax.generate(unrolled, unrolled_params, prompts, **kwargs)), expected)
  streamed = np.stack(list(generation.stream_generate(model, params, prompts, **kwargs)), axis=1)
  np.testing.assert_array_equal(streamed, expected)
  decoded_with = [m.config.scan_layers for m, _ in layouts]
  assert decoded_with == [False, False, False], decoded_with  # scanned, unrolled, streamed: all per-layer arrays


@pytest.mark.parametrize("variant", ["x", "h"])
def test_cross_attention_models_map_layers_and_blocks_to_views(variant):
  """NVLM-X/H: groups/{layers_before, cross_attn, layers_after} -> layers_{i} / cross_attn_{g}; a decode step
  over the views gives the scanned module's logits (gates 0.7, so a misplaced block would show)."""
  model = CLASSES[variant](config_for(variant))
  params = random_params(model, seed=2, gate=0.7)
  decode_model, views = decoding_layout(model, params)
  assert not decode_model.config.llm.scan_layers
  blocks = model.config.cross_attention.num_blocks(model.config.llm.num_layers)
  assert {f"cross_attn_{g}" for g in range(blocks)} <= set(views["language_model"]["decoder"])
  ids, _, pixels, mask, _ = hand_batch(variant, seed=3)
  prefill = jax.jit(
    lambda p, x, px, tm: model.apply({"params": p}, x, pixel_values=px, tile_mask=tm, cache=model.init_cache(2, 96)),
    compiler_options=O0,
  )
  _, cache = prefill(params, ids[:, :80], pixels, mask)
  step = jax.jit(lambda m, p, x, c: m.apply({"params": p}, x, cache=c)[0], static_argnums=0, compiler_options=O0)
  token = ids[:, 80:81]
  np.testing.assert_allclose(
    np.asarray(step(decode_model, views, token, cache)),
    np.asarray(step(model, params, token, cache)),
    rtol=1e-5,
    atol=1e-5,
  )


def test_params_on_several_devices_keep_the_scanned_decode(loaded, caplog, monkeypatch):
  """Views need one buffer per stack; replicated over 2 devices there is none to view: unchanged, and said."""
  _, (model, params), _ = loaded
  monkeypatch.setattr(layer_views, "_reported", set())
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  replicated = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  with caplog.at_level(logging.WARNING, logger="nvlm_jax.layer_views"):
    decode_model, decode_params = decoding_layout(model, replicated)
  assert decode_model is model and decode_params is replicated
  assert "an array on 2 devices" in caplog.text
