"""Multi-head attention with grouped-query heads, masks and a KV cache.

Masks are boolean [B, 1, Lq, Lk] (True = may attend). Masked scores get a large finite negative
value rather than -inf, so a query row with nothing to attend to (padding) yields a finite output
instead of NaN; such rows are padding and never read.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from nvlm_jax.layers.attention_impl import choose_attention_impl, cudnn_attention, log_choice_once, splash_attention
from nvlm_jax.layers.linear import Dense
from nvlm_jax.layers.rope import RotaryEmbedding, apply_rope

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

KVCache = dict[str, jnp.ndarray]  # {"k": [B, S, kv_heads, head_dim], "v": same}


def dot_product_attention(q, k, v, mask, *, scale: float | None = None, causal_block_size: int = 0):
  """softmax(q k^T * scale + mask) v with GQA: q [B,Lq,H,D], k/v [B,Lk,KV,D], H % KV == 0.

  Scores and softmax in fp32 (Megatron's --attention-softmax-in-fp32); returns q.dtype [B,Lq,H,D].

  Heads go first ([B, KV, G*Lq, D] x [B, KV, S, D]) so both batched matmuls read and write contiguous
  tiles and the big score tensor is never transposed, forward or backward.

  causal_block_size > 0 promises that `mask` is causal over aligned positions (query i never sees key
  j > i, Lq == Lk, as in training and the no-cache forward). Queries then go in blocks of that many
  rows, each against only the keys up to its last row: the masked upper triangle is never computed
  (about half the attention FLOPs and memory at long lengths), and every block's softmax still sees
  all of its visible keys, so the result is exact.
  """
  batch, q_len, heads, head_dim = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  scale = head_dim**-0.5 if scale is None else scale
  q = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)  # [B, KV, G, Lq, D]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
  if causal_block_size <= 0 or causal_block_size >= q_len:
    out = _attend_heads_first(q, k, v, mask, scale)
  else:
    if q_len != k_len:
      raise ValueError(f"causal_block_size needs aligned queries and keys; got {q_len} queries, {k_len} keys")
    blocks = []
    for start in range(0, q_len, causal_block_size):
      end = min(start + causal_block_size, q_len)
      block_mask = None if mask is None else mask[:, :, start:end, :end]
      blocks.append(_attend_heads_first(q[:, :, :, start:end], k[:, :, :end], v[:, :, :end], block_mask, scale))
    out = jnp.concatenate(blocks, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


def attend(
  impl: str,
  q,
  k,
  v,
  mask,
  *,
  segment_ids=None,
  causal: bool = False,
  causal_block_size: int = 0,
  scale: float | None = None,
):
  """Attention by the implementation `impl` (a choose_attention_impl result). `mask` is the dense boolean mask
  (None: full attention); `segment_ids` [B, L] the packed segments behind a causal mask (splash reads those)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if impl == "xla":
    return dot_product_attention(q, k, v, mask, scale=scale)
  if impl == "blocked":
    return dot_product_attention(q, k, v, mask, scale=scale, causal_block_size=causal_block_size)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, mask, causal=causal, scale=scale)
  if impl == "splash":
    return splash_attention(q, k, v, segment_ids, causal=causal, scale=scale)
  raise ValueError(f"unknown attention implementation {impl!r}")


def _attend_heads_first(q, k, v, mask, scale: float):
  """q [B, KV, G, Lq, D], k/v [B, KV, S, D], mask [B, 1, Lq, S] or None -> [B, KV, G, Lq, D]."""
  batch, kv_heads, groups, q_len, head_dim = q.shape
  rows = q.reshape(batch, kv_heads, groups * q_len, head_dim)
  scores = jnp.einsum("bkqd,bksd->bkqs", rows, k, preferred_element_type=jnp.float32) * scale
  scores = scores.reshape(batch, kv_heads, groups, q_len, k.shape[2])
  if mask is not None:
    scores = jnp.where(mask[:, :, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(batch, kv_heads, groups * q_len, k.shape[2])
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
  return out.reshape(batch, kv_heads, groups, q_len, head_dim)


def causal_segment_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
  """[B, L] segment ids (0 = padding) -> [B, 1, L, L]: causal, within a segment, never onto padding."""
  length = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids != 0)[:, None, :]
  return (causal[None] & same & real)[:, None]


@flax.struct.dataclass
class CausalSegments:
  """The training/no-cache self-attention mask, kept as segment ids so a fused kernel can take them as is.

  `dense` is causal_segment_mask (for xla, blocked and cudnn); splash reads `segment_ids` directly.
  """

  segment_ids: jnp.ndarray  # [B, L], 0 = padding

  @property
  def dense(self) -> jnp.ndarray:
    return causal_segment_mask(self.segment_ids)


def cached_mask(valid: jnp.ndarray, cache_index: jnp.ndarray, q_len: int) -> jnp.ndarray:
  """Mask for queries written at cache slots [cache_index, cache_index + q_len) over all cache slots.

  `valid` [B, S] marks slots holding real tokens (prompt padding stays False).
  """
  slots = jnp.arange(valid.shape[1])
  q_slots = cache_index + jnp.arange(q_len)
  causal = slots[None, :] <= q_slots[:, None]  # [Lq, S]
  return (causal[None] & valid[:, None, :])[:, None]


def update_cache(cache: KVCache, k: jnp.ndarray, v: jnp.ndarray, index: jnp.ndarray) -> KVCache:
  """Writes k/v [B, L, KV, D] into the cache at slot `index` (same slot for every row)."""
  write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index, axis=1)
  return {"k": write(cache["k"], k), "v": write(cache["v"], v)}


class SelfAttention(nn.Module):
  """RoPE self-attention; q/k/v biases optional (Qwen2 has them, Llama does not)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope: RotaryEmbedding | float  # a bare float: unscaled RoPE with that base
  qkv_bias: bool = False
  causal_block_size: int = 0  # see dot_product_attention; used only without a cache (mask is then causal)
  attention_impl: str = "auto"  # see layers.attention_impl.choose_attention_impl
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x, positions, mask, cache: KVCache | None = None, cache_index=None) -> tuple[Any, KVCache | None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = Dense(
      (self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), use_bias=self.qkv_bias, name="q_proj", **kw
    )(x)
    k = Dense(
      (self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=self.qkv_bias, name="k_proj", **kw
    )(x)
    v = Dense(
      (self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=self.qkv_bias, name="v_proj", **kw
    )(x)
    q = apply_rope(q, positions, self.rope)
    k = apply_rope(k, positions, self.rope)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
    segment_ids = None
    if isinstance(mask, CausalSegments):
      segment_ids, mask = mask.segment_ids, mask.dense
    if cache is not None:
      cache = update_cache(cache, k, v, cache_index)
      k, v = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
      kind = "cached"  # queries sit at a traced offset in the cache: no static triangle to skip
    else:
      kind = "causal" if segment_ids is not None else "dense"
    impl = choose_attention_impl(
      self.attention_impl,
      jax.default_backend(),
      kind,
      q_len=q.shape[1],
      k_len=k.shape[1],
      head_dim=self.head_dim,
      dtype=self.dtype,
    )
    log_choice_once("decoder self-attention", self.attention_impl, kind, impl)
    out = attend(
      impl, q, k, v, mask, segment_ids=segment_ids, causal=kind == "causal", causal_block_size=self.causal_block_size
    )
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
    out = Dense(x.shape[-1], ("heads", "head_dim", "embed"), contract_dims=2, name="o_proj", **kw)(out)
    return out, cache
