"""Which attention kernel runs where: the `attention_impl` setting, its `auto` choice and the fused kernels.

`xla` is the reference einsum + fp32 softmax, `blocked` its causal variant that skips the masked triangle
(both in layers.attention), `cudnn` is cuDNN flash attention through jax.nn.dot_product_attention, `splash`
is Pallas splash attention (TPU; in interpret mode elsewhere, which is how the CPU tests run it).

Mask kinds: "causal" (aligned causal self-attention over packed segments, 0 = padding: training and the
no-cache forward), "full" (no mask: the ViT), "dense" (any other boolean mask: cross-attention to image tokens),
"cached" (queries at a traced offset in a KV cache: prefill and decode).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from nvlm_jax.config import validate_attention_impl

MASK_KINDS = ("causal", "full", "dense", "cached")
SPLASH_BLOCK = 128  # splash tiles queries and keys in blocks of this many rows
_CUDNN_DTYPES = ("bfloat16", "float16")  # cuDNN flash attention has no fp32 kernel
_CUDNN_MAX_HEAD_DIM = 128

log = logging.getLogger(__name__)


def supports(impl: str, backend: str, kind: str, *, q_len: int, k_len: int, head_dim: int, dtype: str) -> bool:
  """Whether `impl` can compute attention with this mask kind and these shapes on `backend`."""
  if impl == "xla":
    return True
  if impl == "blocked":
    return kind == "causal" and q_len == k_len
  if impl == "cudnn":
    return (
      backend == "gpu"
      and kind in ("causal", "full", "dense")
      and str(dtype) in _CUDNN_DTYPES
      and head_dim <= _CUDNN_MAX_HEAD_DIM
      and head_dim % 8 == 0
    )
  if impl == "splash":  # backend is not checked here: off TPU it runs in interpret mode (tests, not speed)
    return kind in ("causal", "full") and q_len % SPLASH_BLOCK == 0 and k_len % SPLASH_BLOCK == 0
  raise ValueError(f"unknown attention implementation {impl!r}")


def choose_attention_impl(
  requested: str, backend: str, kind: str, *, q_len: int, k_len: int, head_dim: int, dtype: str
) -> str:
  """Pure choice: (requested setting, backend, mask kind, shapes, dtype) -> the implementation that runs.

  `auto` takes the fused kernel of the backend (cudnn on gpu, splash on tpu) where it supports the mask and
  shapes; an explicit setting is honoured where it can express the mask (decode steps over a KV cache, for
  instance, always go to xla). Everything else falls back to blocked (causal) or xla.
  """
  validate_attention_impl(requested, "attention")
  if kind not in MASK_KINDS:
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
  shapes = dict(q_len=q_len, k_len=k_len, head_dim=head_dim, dtype=dtype)
  if requested == "auto":
    fused = {"gpu": "cudnn", "tpu": "splash"}.get(backend)
    candidates = ([fused] if fused else []) + ["blocked", "xla"]
  else:
    candidates = [requested, "blocked", "xla"]
  if backend != "tpu" and requested == "auto":
    candidates = [c for c in candidates if c != "splash"]
  return next(c for c in candidates if supports(c, backend, kind, **shapes))


@functools.cache
def log_choice_once(where: str, requested: str, kind: str, chosen: str) -> None:
  """Says once per (site, setting, mask kind, choice) which kernel runs (traced code calls this per trace)."""
  log.info("%s: attention_impl=%s, %s mask -> %s", where, requested, kind, chosen)


def cudnn_attention(q, k, v, mask, *, causal: bool, scale: float, implementation: str | None = "cudnn"):
  """jax.nn.dot_product_attention (q [B,Lq,H,D], k/v [B,Lk,KV,D], GQA native); the boolean mask carries
  padding and packed segments, is_causal lets the kernel skip the masked blocks. `implementation` is "cudnn"
  in use; the tests pass "xla" to check this call's conventions on CPU."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, implementation=implementation)


def splash_attention(q, k, v, segment_ids, *, causal: bool, scale: float):
  """Pallas splash attention. q [B,L,H,D], k/v [B,L,KV,D]; segment_ids [B,L] (None: one segment).

  GQA: each KV head is an MQA kernel call over its G query heads (vmapped over batch and KV heads).
  Padding (segment 0) only attends to padding, so its rows are garbage-but-finite and never read.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  batch, q_len, heads, head_dim = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  shape = (q_len, k_len)
  head_mask = sm.CausalMask(shape) if causal else sm.FullMask(shape)
  block = SPLASH_BLOCK
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  kernel = sk.make_splash_mqa_single_device(
    sm.MultiHeadMask([head_mask] * groups), block_sizes=sizes, interpret=jax.default_backend() != "tpu"
  )
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, L, D]
  if segment_ids is None:
    segment_ids = jnp.ones((batch, q_len), jnp.int32)
  seg = sk.SegmentIds(q=segment_ids.astype(jnp.int32), kv=segment_ids.astype(jnp.int32))
  per_kv_head = jax.vmap(lambda qh, kh, vh, s: kernel(qh, kh, vh, segment_ids=s), in_axes=(0, 0, 0, None))
  out = jax.vmap(per_kv_head, in_axes=(0, 0, 0, 0))(qg, kt, vt, seg)  # [B, KV, G, L, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)
