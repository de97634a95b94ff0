"""Sampling follows its definition: token frequencies match a numpy re-derivation of the distribution.

The oracle applies the definitions directly (as transformers' logits warpers do, in the same order):
softmax(logits / temperature); top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely
tokens whose mass reaches top_p. Tens of thousands of draws on fixed logits must match it within 5 standard
errors per token, and filtered tokens must never be drawn. The same holds through `generate` for the first
generated token of a real (tiny) model, whose default EOS comes from its config.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nvlm_jax
from nvlm_jax import models
from nvlm_jax.config import DecoderConfig
from nvlm_jax.generation import SamplingConfig, sample_token

LOGITS = np.array([2.0, 1.6, 1.1, 0.4, -0.3, -1.2, -2.0, 0.9], np.float32)
DRAWS = 40_000


def oracle(logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
  """The sampling distribution by definition, in float64."""
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  keep = np.zeros(len(p), bool)
  keep[order[: top_k or len(p)]] = True
  p = np.where(keep, p, 0.0) / p[keep].sum()
  if top_p is not None:
    kept, mass = np.zeros(len(p), bool), 0.0
    for i in order:
      if mass >= top_p:
        break
      kept[i], mass = True, mass + p[i]
    p = np.where(kept, p, 0.0) / p[kept].sum()
  return p


def assert_frequencies_match(tokens: np.ndarray, expected: np.ndarray):
  counts = np.bincount(tokens.ravel(), minlength=len(expected))
  n = counts.sum()
  freq = counts / n
  assert (counts[expected == 0] == 0).all(), f"filtered tokens drawn: {counts} for {np.round(expected, 4)}"
  tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12
  bad = np.abs(freq - expected) > tolerance
  assert not bad.any(), f"frequencies {np.round(freq, 4)} vs expected {np.round(expected, 4)} (n={n})"


CASES = [
  {"temperature": 1.0},
  {"temperature": 0.5},
  {"temperature": 2.0},
  {"temperature": 1.0, "top_k": 3},
  {"temperature": 1.0, "top_p": 0.8},
  {"temperature": 0.7, "top_k": 5, "top_p": 0.9},
]


def test_the_oracle_cases_differ_from_each_other():
  """Each knob moves the distribution by far more than the tolerance, so ignoring it cannot pass."""
  dists = [oracle(LOGITS, **c) for c in CASES]
  for i in range(len(dists)):
    for j in range(i + 1, len(dists)):
      assert np.abs(dists[i] - dists[j]).max() > 0.03, (CASES[i], CASES[j])


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sample_token_frequencies_match_the_definition(case):
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, len(LOGITS)))
  tokens = sample_token(logits, jax.random.key(0), SamplingConfig(**case))
  assert_frequencies_match(np.asarray(tokens), oracle(LOGITS, **case))


def test_temperature_zero_is_argmax():
  logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
  np.testing.assert_array_equal(sample_token(logits, jax.random.key(0), SamplingConfig()), [0, len(LOGITS) - 1])


# --- through generate, on a tiny model ----------------------------------------------------------------

CONFIG = DecoderConfig(
  vocab_size=16,
  hidden_size=32,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  intermediate_size=64,
  eos_token_id=None,
  pad_token_id=None,
)
PROMPT = np.array([[3, 7, 1, 12, 5, 9]], np.int32)


@pytest.fixture(scope="module")
def tiny():
  model = models.module_for_config(CONFIG)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(PROMPT))["params"])
  params["lm_head"] = jax.tree.map(lambda w: 8 * w, params["lm_head"])  # spread logits: the knobs matter
  return model, params


@pytest.mark.parametrize(
  "case",
  [{"temperature": 0.6, "top_p": 0.85}, {"temperature": 1.5, "top_k": 6}],
  ids=["temperature,top_p", "temperature,top_k"],
)
def test_generate_samples_the_first_token_from_the_model_distribution(tiny, case):
  model, params = tiny
  last = np.asarray(model.apply({"params": params}, PROMPT))[0, -1]
  rows = 6_000
  tokens = nvlm_jax.generate(model, params, np.repeat(PROMPT, rows, 0), max_new_tokens=1, rng=jax.random.key(1), **case)
  assert_frequencies_match(np.asarray(tokens)[:, 0], oracle(last, **case))


def test_generate_stops_at_the_eos_of_the_model_config_by_default(tiny):
  model, params = tiny
  free = np.asarray(nvlm_jax.generate(model, params, PROMPT, max_new_tokens=12))[0]
  eos = int(free[3])
  first = int(np.flatnonzero(free == eos)[0])
  assert first < 11, "the chosen EOS must leave tokens after it"
  with_eos = models.module_for_config(CONFIG.replace(eos_token_id=(eos, 10_000), pad_token_id=-1))
  stopped = np.asarray(nvlm_jax.generate(with_eos, params, PROMPT, max_new_tokens=12))[0]  # no eos_token_id given
  np.testing.assert_array_equal(stopped[: first + 1], free[: first + 1])
  assert (stopped[first + 1 :] == -1).all(), stopped
