"""The language model: a Qwen2 / Llama-family causal decoder with a KV cache.

`CausalLM` is used alone (text-only models) and as the decoder inside the NVLM fusion models, which
feed it `inputs_embeds` instead of token ids. Layers run under `nn.scan` (one compiled layer body,
parameters stacked on a leading "layers" axis) and `nn.remat` when the config asks for them.

Cache layout (see `init_cache`): {"layers": {"k", "v": [num_layers, B, S, kv_heads, head_dim]},
"index": int32 next slot, "valid": bool [B, S] slots holding real tokens}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvlm_jax.config import DecoderConfig
from nvlm_jax.layers.attention import CausalSegments, SelfAttention, cached_mask
from nvlm_jax.layers.linear import Dense, Embedding
from nvlm_jax.layers.mlp import SwiGLU
from nvlm_jax.layers.norms import RMSNorm
from nvlm_jax.layers.remat import maybe_remat
from nvlm_jax.layers.rope import RotaryEmbedding
from nvlm_jax.layers.scan import scan_layers

Cache = dict[str, Any]
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_index=None, cache=None):
    """Argument order is nn.scan's: carry, broadcast args, then the scanned per-layer cache."""
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    h = RMSNorm(cfg.rms_norm_eps, name="input_norm", **kw)(x)
    rope = RotaryEmbedding(cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    h, cache = SelfAttention(
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.kv_head_dim,
      rope,
      cfg.qkv_bias,
      cfg.causal_block_size,
      cfg.attention_impl,
      name="self_attn",
      **kw,
    )(h, positions, mask, cache, cache_index)
    x = x + h
    h = RMSNorm(cfg.rms_norm_eps, name="post_attn_norm", **kw)(x)
    x = x + SwiGLU(cfg.hidden_size, cfg.intermediate_size, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), cache


class DecoderStack(nn.Module):
  """num_layers DecoderLayers: scanned (params stacked under `layers`) or unrolled (`layers_{i}`)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    cfg = self.config
    layer_cls = maybe_remat(DecoderLayer, cfg.remat_policy, cfg.scan_layers)
    if cfg.scan_layers:
      stack = scan_layers(layer_cls, cfg.num_layers, num_broadcast=3, num_scanned=1)
      return stack(cfg, name="layers")(x, positions, mask, cache_index, cache)
    new_cache = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
      x, layer_cache = layer_cls(cfg, name=f"layers_{i}")(x, positions, mask, cache_index, layer_cache)
      new_cache.append(layer_cache)
    if cache is not None:
      cache = jax.tree.map(lambda *c: jnp.stack(c), *new_cache)
    return x, cache


def keep_last(hidden: jnp.ndarray, count: int) -> jnp.ndarray:
  """hidden [B, L, D] -> its last `count` positions (all of them for count 0)."""
  return hidden[:, -count:] if count else hidden


def default_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
  """Positions counting real tokens only, so left padding does not shift RoPE."""
  return jnp.maximum(jnp.cumsum(segment_ids != 0, axis=1) - 1, 0).astype(jnp.int32)


class CausalLM(nn.Module):
  """Embedding -> DecoderStack -> final RMSNorm -> LM head.

  __call__(input_ids [B, L] or inputs_embeds [B, L, D], positions=None, segment_ids=None, cache=None)
  returns logits [B, L, vocab]; with a cache it returns (logits, updated cache). logits_to_keep=n > 0 projects
  only the last n positions ([B, n, vocab]): a prefill needs one row, not L x vocab.
  segment_ids: 0 marks padding; distinct ids separate packed samples. positions default to counting
  real tokens. Positions and segment ids are per token, so left- or right-padded batches both work.
  """

  config: DecoderConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
    self.decoder = self._make_decoder()
    self.final_norm = RMSNorm(cfg.rms_norm_eps, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense(cfg.vocab_size, ("embed", "vocab"), **kw)

  def _make_decoder(self) -> nn.Module:
    """The layer stack (param name `decoder`); NVLM-X/H override it to interleave cross-attention."""
    return DecoderStack(self.config)

  def embed(self, input_ids: jnp.ndarray) -> jnp.ndarray:
    return self.embed_tokens(input_ids)

  def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
    h = self.final_norm(hidden)
    out = self.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
    return nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_vocab"))

  def __call__(
    self,
    input_ids=None,
    *,
    inputs_embeds=None,
    positions=None,
    segment_ids=None,
    cache: Cache | None = None,
    logits_to_keep: int = 0,
  ):
    hidden, cache = self.hidden_states(
      input_ids, inputs_embeds=inputs_embeds, positions=positions, segment_ids=segment_ids, cache=cache
    )
    logits = self.logits(keep_last(hidden, logits_to_keep))
    return logits if cache is None else (logits, cache)

  def hidden_states(
    self, input_ids=None, *, inputs_embeds=None, positions=None, segment_ids=None, cache: Cache | None = None
  ):
    """The decoder body without the head: (hidden [B, L, D] before the final norm, cache)."""
    x, positions, segment_ids = self._decoder_inputs(input_ids, inputs_embeds, positions, segment_ids, cache)
    if cache is None:
      x, _ = self.decoder(x, positions, CausalSegments(segment_ids))
      return x, None
    mask, valid = self._cached_mask(cache, segment_ids)
    x, layer_cache = self.decoder(x, positions, mask, cache["layers"], cache["index"])
    return x, self._advance_cache(cache, layer_cache, valid, x.shape[1])

  def _decoder_inputs(self, input_ids, inputs_embeds, positions, segment_ids, cache):
    """(embeddings [B, L, D], positions, segment_ids) with the defaults filled in."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
    batch, length = x.shape[:2]
    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    if positions is None:
      positions = default_positions(segment_ids)
      if cache is not None:  # decoding continues after the real tokens already in the cache
        positions = positions + jnp.sum(cache["valid"], axis=1, keepdims=True).astype(jnp.int32)
    return x, positions, segment_ids

  @staticmethod
  def _cached_mask(cache: Cache, segment_ids):
    """(attention mask of the new tokens over every cache slot, the updated `valid` slots)."""
    index = cache["index"]
    valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], segment_ids != 0, index, axis=1)
    return cached_mask(valid, index, segment_ids.shape[1]), valid

  @staticmethod
  def _advance_cache(cache: Cache, layer_cache, valid, length: int) -> Cache:
    """The cache after writing `length` tokens; entries other than layers/index/valid pass through."""
    return {**cache, "layers": layer_cache, "index": cache["index"] + length, "valid": valid}

  def init_cache(self, batch_size: int, max_length: int, dtype: str | None = None) -> Cache:
    """An empty KV cache for `max_length` tokens (prompt + generated)."""
    cfg = self.config
    shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.kv_head_dim)
    dtype = dtype or cfg.dtype
    return {
      "layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
      "index": jnp.zeros((), jnp.int32),
      "valid": jnp.zeros((batch_size, max_length), bool),
    }
