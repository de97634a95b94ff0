"""attention_impl: every implementation that runs on CPU matches xla (values and gradients), splash in Pallas
interpret mode, and the pure choice of `auto` per backend and mask kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvlm_jax.config import DecoderConfig, VisionConfig
from nvlm_jax.language.decoder import CausalLM
from nvlm_jax.layers.attention import attend, causal_segment_mask
from nvlm_jax.layers.attention_impl import choose_attention_impl, cudnn_attention

LENGTH = 128  # splash tiles in 128-row blocks
# Row 0: two packed samples then right padding; row 1: left padding then one sample.
SEGMENTS = np.array([[1] * 70 + [2] * 40 + [0] * 18, [0] * 9 + [1] * 119], np.int32)


def qkv(batch=2, length=LENGTH, heads=4, kv_heads=2, head_dim=16, k_len=None, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  k_len = k_len or length
  return (
    jax.random.normal(keys[0], (batch, length, heads, head_dim)),
    jax.random.normal(keys[1], (batch, k_len, kv_heads, head_dim)),
    jax.random.normal(keys[2], (batch, k_len, kv_heads, head_dim)),
  )


def run(fn, q, k, v, rows):
  """Outputs on the rows that are read (real tokens) and the gradients of a loss over those rows only."""
  weights = jax.random.normal(jax.random.key(7), q.shape) * rows[:, :, None, None]
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  return fn(q, k, v) * rows[:, :, None, None], jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_same(got, want):
  np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("impl", ["blocked", "cudnn_call", "splash"])
def test_causal_packed_padded_gqa_matches_xla(impl):
  q, k, v = qkv()
  seg = jnp.asarray(SEGMENTS)
  mask = causal_segment_mask(seg)
  rows = (seg != 0).astype(jnp.float32)
  want = run(lambda q, k, v: attend("xla", q, k, v, mask), q, k, v, rows)
  if impl == "cudnn_call":  # the cudnn path's call into jax.nn.dot_product_attention, run by XLA on CPU
    fn = lambda q, k, v: cudnn_attention(q, k, v, mask, causal=True, scale=16**-0.5, implementation="xla")
  else:
    fn = lambda q, k, v: attend(impl, q, k, v, mask, segment_ids=seg, causal=True, causal_block_size=32)
  assert_same(run(fn, q, k, v, rows), want)


@pytest.mark.parametrize("impl", ["cudnn_call", "splash"])
def test_full_attention_matches_xla(impl):
  """The ViT's unmasked attention (GQA here too, which splash and cuDNN take natively)."""
  q, k, v = qkv(batch=1)
  rows = jnp.ones(q.shape[:2])
  want = run(lambda q, k, v: attend("xla", q, k, v, None), q, k, v, rows)
  if impl == "cudnn_call":
    fn = lambda q, k, v: cudnn_attention(q, k, v, None, causal=False, scale=16**-0.5, implementation="xla")
  else:
    fn = lambda q, k, v: attend("splash", q, k, v, None)
  assert_same(run(fn, q, k, v, rows), want)


def test_cross_attention_mask_through_cudnn_call_matches_xla():
  """Text queries onto image tokens with an arbitrary boolean mask (rows with no keys are never read)."""
  q, k, v = qkv(length=24, k_len=40)
  mask = jax.random.bernoulli(jax.random.key(3), 0.6, (2, 1, 24, 40)).at[:, :, :, 0].set(True)
  rows = jnp.ones(q.shape[:2])
  want = run(lambda q, k, v: attend("xla", q, k, v, mask), q, k, v, rows)
  fn = lambda q, k, v: cudnn_attention(q, k, v, mask, causal=False, scale=16**-0.5, implementation="xla")
  assert_same(run(fn, q, k, v, rows), want)


SHAPES = dict(q_len=4096, k_len=4096, head_dim=128, dtype="bfloat16")


@pytest.mark.parametrize(
  "backend, kind, want",
  [
    ("gpu", "causal", "cudnn"),
    ("gpu", "full", "cudnn"),
    ("gpu", "dense", "cudnn"),
    ("gpu", "cached", "xla"),
    ("tpu", "causal", "splash"),
    ("tpu", "full", "splash"),
    ("tpu", "dense", "xla"),
    ("tpu", "cached", "xla"),
    ("cpu", "causal", "blocked"),
    ("cpu", "full", "xla"),
    ("cpu", "dense", "xla"),
    ("cpu", "cached", "xla"),
  ],
)
def test_auto_choice_per_backend_and_mask(backend, kind, want):
  assert choose_attention_impl("auto", backend, kind, **SHAPES) == want


def test_auto_falls_back_where_the_fused_kernel_cannot_run():
  fp32 = dict(SHAPES, dtype="float32")
  assert choose_attention_impl("auto", "gpu", "causal", **fp32) == "blocked"  # no fp32 cuDNN flash kernel
  assert choose_attention_impl("auto", "gpu", "full", **dict(SHAPES, head_dim=256)) == "xla"
  odd = dict(SHAPES, q_len=1000, k_len=1000)
  assert choose_attention_impl("auto", "tpu", "causal", **odd) == "blocked"  # not a multiple of splash's block
  assert choose_attention_impl("auto", "tpu", "full", **dict(SHAPES, q_len=1025, k_len=1025)) == "xla"


def test_explicit_setting_is_honoured_or_falls_back():
  assert choose_attention_impl("xla", "gpu", "causal", **SHAPES) == "xla"
  assert choose_attention_impl("splash", "cpu", "causal", **SHAPES) == "splash"  # interpret mode off TPU
  assert choose_attention_impl("cudnn", "cpu", "causal", **SHAPES) == "blocked"  # no cuDNN here
  assert choose_attention_impl("splash", "tpu", "cached", **SHAPES) == "xla"  # decode steps over a KV cache
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    DecoderConfig(
      vocab_size=8,
      hidden_size=8,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      intermediate_size=8,
      attention_impl="flash",
    )
  with pytest.raises(ValueError, match="vision.attention_impl"):
    VisionConfig(
      image_size=28, patch_size=14, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, attention_impl="nope"
    )


def test_decoder_with_splash_matches_xla():
  """The decoder's call site hands the packed segment ids to splash (not only the dense mask)."""
  cfg = DecoderConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    causal_block_size=32,
    attention_impl="xla",
  )
  ids = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, 64)
  seg = jnp.asarray(SEGMENTS)
  model = CausalLM(cfg)
  params = model.init(jax.random.key(0), ids, segment_ids=seg)
  want = model.apply(params, ids, segment_ids=seg)
  got = CausalLM(cfg.replace(attention_impl="splash")).apply(params, ids, segment_ids=seg)
  real = np.asarray(SEGMENTS != 0)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=2e-5)


def test_planner_attention_report_per_backend():
  from nvlm_jax.training.plan import attention_report

  cfg = DecoderConfig(
    vocab_size=64, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1024, dtype="bfloat16"
  )
  report = lambda backend, seq: attention_report(cfg, batch_per_device=2, seq_len=seq, tensor=2, backend=backend)
  [gpu] = report("gpu", 4096)
  assert gpu["impl"] == "cudnn" and gpu["mask"] == "causal"
  # fp32 scores + bf16 probabilities, 8 heads over tensor=2, 4 layers, halved by the blocked causal path.
  assert gpu["estimated_bytes_saved_per_device"] == 2 * 4 * 4096 * 4096 * 6 * 4 // 2
  [cpu] = report("cpu", 4096)
  assert cpu["impl"] == "blocked" and cpu["estimated_bytes_saved_per_device"] == 0
  [tpu] = report("tpu", 4000)  # not a multiple of splash's 128-row block
  assert tpu["impl"] == "blocked" and report("tpu", 4096)[0]["impl"] == "splash"
