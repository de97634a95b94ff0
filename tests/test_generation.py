"""Generation against transformers `generate`: greedy tokens identical, padded batches, EOS, sampling."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import nvlm_jax
import reference_models as rm

NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory):
  """(torch reference, our model, our params) with the same random weights."""
  config = rm.tiny_qwen2_config() if request.param == "qwen2" else rm.tiny_llama_config()
  reference = rm.build_causal_lm(config, seed=3)
  directory = rm.save(reference, tmp_path_factory.mktemp(request.param))
  model, params = nvlm_jax.load_pretrained(directory)
  return reference, model, params


def reference_greedy(reference, prompt: np.ndarray, new_tokens: int = NEW_TOKENS) -> np.ndarray:
  """transformers' greedy tokens after `prompt` ([L] -> [new_tokens], or [B, L] -> [B, new_tokens])."""
  ids = torch.as_tensor(np.atleast_2d(prompt), dtype=torch.long)
  with torch.no_grad():  # an explicit mask: with pad_token_id set, transformers would hide prompt tokens == pad
    out = reference.generate(
      ids,
      attention_mask=torch.ones_like(ids),
      max_new_tokens=new_tokens,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    )
  tokens = out[:, ids.shape[1] :].numpy()
  return tokens[0] if prompt.ndim == 1 else tokens


def test_greedy_tokens_equal_transformers_generate(pair):
  reference, model, params = pair
  prompt = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (300,), seed=5)  # long: RoPE bugs show
  ours = nvlm_jax.generate(model, params, prompt[None], max_new_tokens=NEW_TOKENS, eos_token_id=[])
  np.testing.assert_array_equal(np.asarray(ours[0]), reference_greedy(reference, prompt))


def test_logits_to_keep_returns_the_last_positions(pair):
  """What generate's prefill relies on: logits_to_keep=n gives exactly the last n columns of the full logits."""
  _, model, params = pair
  ids = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (2, 40), seed=6)
  full = np.asarray(model.apply({"params": params}, ids))
  last = np.asarray(model.apply({"params": params}, ids, logits_to_keep=3))
  assert last.shape == (2, 3, full.shape[-1])
  np.testing.assert_allclose(last, full[:, -3:], rtol=1e-6, atol=1e-6)


def test_padded_batch_equals_each_prompt_alone(pair):
  _, model, params = pair
  vocab = rm.TINY_TEXT["vocab_size"]
  prompts = [rm.random_tokens(vocab, (n,), seed=n) for n in (37, 90, 64)]
  width = max(len(p) for p in prompts)
  for side in ("left", "right"):
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
      span = slice(width - len(p), width) if side == "left" else slice(0, len(p))
      ids[row, span], mask[row, span] = p, 1
    batch = np.asarray(nvlm_jax.generate(model, params, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[]))
    for row, p in enumerate(prompts):
      alone = nvlm_jax.generate(model, params, p[None], max_new_tokens=16, eos_token_id=[])
      np.testing.assert_array_equal(batch[row], np.asarray(alone[0]), err_msg=f"{side} padding, row {row}")


def test_stops_at_eos_then_pads(pair):
  _, model, params = pair
  prompt = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (1, 40), seed=9)
  free = np.asarray(nvlm_jax.generate(model, params, prompt, max_new_tokens=12, eos_token_id=[]))[0]
  eos = int(free[4])  # pretend the 5th generated token is EOS
  stopped = np.asarray(nvlm_jax.generate(model, params, prompt, max_new_tokens=12, eos_token_id=eos, pad_token_id=-7))[
    0
  ]
  first = int(np.flatnonzero(free == eos)[0])
  np.testing.assert_array_equal(stopped[: first + 1], free[: first + 1])
  assert (stopped[first + 1 :] == -7).all()


def test_sampling_is_reproducible_per_key_and_top_k_1_is_greedy(pair):
  _, model, params = pair
  prompt = rm.random_tokens(rm.TINY_TEXT["vocab_size"], (2, 20), seed=11)
  kwargs = dict(max_new_tokens=10, eos_token_id=[], temperature=1.0)
  a = nvlm_jax.generate(model, params, prompt, rng=jax.random.key(1), **kwargs)
  b = nvlm_jax.generate(model, params, prompt, rng=jax.random.key(1), **kwargs)
  c = nvlm_jax.generate(model, params, prompt, rng=jax.random.key(2), **kwargs)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  top1 = nvlm_jax.generate(model, params, prompt, rng=jax.random.key(3), top_k=1, **kwargs)
  greedy = nvlm_jax.generate(model, params, prompt, max_new_tokens=10, eos_token_id=[])
  np.testing.assert_array_equal(top1, greedy)
  with pytest.raises(ValueError, match="needs an explicit PRNG key"):
    nvlm_jax.generate(model, params, prompt, max_new_tokens=2, temperature=0.5)
