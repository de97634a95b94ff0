"""dot_product_attention: GQA against a plain numpy softmax, and the causal block path against the full one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvlm_jax.layers.attention import causal_segment_mask, dot_product_attention


def numpy_attention(q, k, v, mask):
  """Per-head softmax(q k^T / sqrt(d)) v, query head h reading kv head h // (H / KV)."""
  heads, kv_heads = q.shape[2], k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for b in range(q.shape[0]):
    for h in range(heads):
      kh = h // (heads // kv_heads)
      scores = q[b, :, h] @ k[b, :, kh].T / np.sqrt(q.shape[-1])
      if mask is not None:
        scores = np.where(mask[b, 0], scores, -1e30)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[b, :, kh]
  return out


def random_qkv(batch=2, length=37, heads=6, kv_heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(np.float32)
  return q, k, v


# Two packed samples and right padding in row 0, one sample with left padding in row 1.
SEGMENTS = np.array([[1] * 20 + [2] * 12 + [0] * 5, [0] * 4 + [1] * 33], np.int32)


@pytest.mark.parametrize("mask_kind", ["none", "causal_segments"])
def test_gqa_matches_numpy(mask_kind):
  q, k, v = random_qkv()
  mask = None if mask_kind == "none" else np.asarray(causal_segment_mask(jnp.asarray(SEGMENTS)))
  with jax.default_matmul_precision("highest"):
    out = np.asarray(dot_product_attention(q, k, v, mask))
  expected = numpy_attention(q, k, v, mask)
  real = np.ones(SEGMENTS.shape, bool) if mask is None else SEGMENTS != 0  # padding rows are never read
  np.testing.assert_allclose(out[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [5, 16, 36, 37, 64])  # not dividing L, dividing L - 5, >= L (one block)
def test_causal_blocks_are_exact(block):
  """Skipping the masked triangle changes neither the outputs of real tokens nor any gradient."""
  q, k, v = random_qkv()
  mask = causal_segment_mask(jnp.asarray(SEGMENTS))
  real = jnp.asarray(SEGMENTS != 0)[..., None, None]

  def loss(q, k, v, block_size):
    out = dot_product_attention(q, k, v, mask, causal_block_size=block_size)
    return jnp.sum(jnp.where(real, jnp.sin(out), 0.0)), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  with jax.default_matmul_precision("highest"):
    (full_loss, full_out), full_grads = grad(q, k, v, 0)
    (block_loss, block_out), block_grads = grad(q, k, v, block)
  keep = np.asarray(SEGMENTS != 0)
  np.testing.assert_allclose(np.asarray(block_out)[keep], np.asarray(full_out)[keep], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(block_loss, full_loss, rtol=1e-6)
  for name, g_block, g_full in zip("qkv", block_grads, full_grads):
    np.testing.assert_allclose(np.asarray(g_block), np.asarray(g_full), rtol=1e-5, atol=1e-6, err_msg=name)


def test_causal_blocks_need_aligned_queries_and_keys():
  q, k, v = random_qkv(length=8)
  with pytest.raises(ValueError, match="8 queries, 16 keys"):
    dot_product_attention(q, np.concatenate([k, k], 1), np.concatenate([v, v], 1), None, causal_block_size=4)
