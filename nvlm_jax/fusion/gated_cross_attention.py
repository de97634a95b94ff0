"""Gated cross-attention blocks interleaved with the LLM's layers (NVLM-X, NVLM-H).

One block (Flamingo's GATED XATTN-DENSE, Llama 3.2 Vision's cross-attention layer):

    h = x + tanh(attn_gate) * XAttn(RMSNorm(x), memory)        # queries: text; keys/values: the image stream
    y = h + tanh(mlp_gate)  * SwiGLU(RMSNorm(h))

with both gates initialized to 0, so an untrained model computes exactly its LLM. XAttn has the LLM's
head layout (GQA), no biases, no RoPE (the key/value stream is a set of tiles, not a sequence), an
RMSNorm on the memory before the key/value projections and RMSNorm q/k norms over head_dim. A query
row with no visible key gets a ZERO attention output (not the uniform average a fully masked softmax
would give) and, with `skip_tokens_without_image`, no feed-forward update either.

Placement: block g runs before LLM layer `g * every + offset`. Scanned, the decoder is an nn.scan over
G = num_layers / every groups; a group is

    layers_before (nn.scan over `offset` LLM layers) -> cross_attn -> layers_after (every - offset layers)

so the LLM's stacked params [L, ...] become [G, offset, ...] and [G, every - offset, ...] (logical axes
("layer_groups", "layers", ...); a block's params are ("layer_groups", ...)):
LLM layer i = g * every + j lives at layers_before[g, j] (j < offset) or layers_after[g, j - offset].
`split_layer_groups` below does this reshape (`convert stitch` one layer at a time). Unrolled (`scan_layers=False`) the
LLM layers keep CausalLM's names `layers_{i}` and the blocks are `cross_attn_{g}`.

The KV cache keeps CausalLM's layout ({"layers": {"k", "v": [L, B, S, kv_heads, head_dim]}, "index",
"valid"}) plus "cross": {"k", "v": [G, B, S_img, kv_heads, head_dim], "visible": [B, S_img]}: the
per-block projected image keys/values (computed once, at the call that brings the images) and which of
them tokens after the prompt may see.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvlm_jax.config import CrossAttentionConfig, DecoderConfig
from nvlm_jax.language.decoder import (
  ACTIVATION_AXES,
  Cache,
  CausalLM,
  DecoderLayer,
  keep_last,
)
from nvlm_jax.layers.attention import CausalSegments, attend
from nvlm_jax.layers.attention_impl import choose_attention_impl, log_choice_once
from nvlm_jax.layers.linear import Dense
from nvlm_jax.layers.mlp import SwiGLU
from nvlm_jax.layers.norms import RMSNorm
from nvlm_jax.layers.remat import maybe_remat
from nvlm_jax.layers.scan import scan_layers

CrossInputs = dict[str, Any]  # see CrossAttentionLM.hidden_states
# Logical name of the scanned group axis. Inside a group the LLM layers keep CausalLM's "layers" axis, so a
# grouped LLM param is ("layer_groups", "layers", ...): flax refuses one name twice on an array. Not in the
# rules table, so never sharded (like "layers").
GROUP_AXIS = "layer_groups"


class GatedCrossAttention(nn.Module):
  """One gated cross-attention + gated feed-forward block (params: attn_norm, q_proj, q_norm, memory_norm,
  k_proj, k_norm, v_proj, o_proj, attn_gate, mlp_norm, mlp, mlp_gate)."""

  config: DecoderConfig
  xattn: CrossAttentionConfig

  @nn.compact
  def __call__(self, x, mask, has_keys, memory=None, kv=None):
    """x [B, L, D]; mask [B, 1, L, S] bool; has_keys [B, L] bool; memory [B, S, D] (keys/values computed
    here) or kv {"k", "v": [B, S, kv_heads, head_dim]} (precomputed, e.g. cached). Returns (x, kv).

    With neither memory nor kv (text only) the block is skipped.
    """
    if memory is None and kv is None:
      return x, None
    cfg, xc = self.config, self.xattn
    heads, kv_heads, head_dim = xc.heads(cfg)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    init = nn.initializers.normal(stddev=xc.init_std)
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, name=name, **kw)
    gate_init = nn.initializers.constant(xc.gate_init)

    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    h = norm("attn_norm")(x)
    q = Dense((heads, head_dim), ("embed", "heads", "head_dim"), name="q_proj", kernel_init=init, **kw)(h)
    if xc.qk_norm:
      q = norm("q_norm")(q)
    if kv is None:
      m = norm("memory_norm")(memory) if xc.memory_norm else memory.astype(cfg.dtype)
      k = Dense((kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj", kernel_init=init, **kw)(m)
      v = Dense((kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj", kernel_init=init, **kw)(m)
      if xc.qk_norm:
        k = norm("k_norm")(k)
      kv = {"k": k, "v": v}
    attn_gate = self.param("attn_gate", nn.with_logical_partitioning(gate_init, ()), (), jnp.dtype(cfg.param_dtype))
    mlp_gate = self.param("mlp_gate", nn.with_logical_partitioning(gate_init, ()), (), jnp.dtype(cfg.param_dtype))
    o_proj = Dense(x.shape[-1], ("heads", "head_dim", "embed"), contract_dims=2, name="o_proj", kernel_init=init, **kw)
    keep = has_keys[..., None]
    if kv["k"].shape[1]:  # an empty image stream (S = 0) leaves every row without keys
      k, v = kv["k"].astype(cfg.dtype), kv["v"].astype(cfg.dtype)
      impl = choose_attention_impl(
        cfg.attention_impl,
        jax.default_backend(),
        "dense",
        q_len=q.shape[1],
        k_len=k.shape[1],
        head_dim=head_dim,
        dtype=cfg.dtype,
      )
      log_choice_once("gated cross-attention", cfg.attention_impl, "dense", impl)
      out = attend(impl, q, k, v, mask)
      out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
      out = o_proj(out)
      x = x + jnp.where(keep, jnp.tanh(attn_gate).astype(cfg.dtype) * out, jnp.zeros((), cfg.dtype))
    h = norm("mlp_norm")(x)
    f = SwiGLU(cfg.hidden_size, xc.ffn_size(cfg), name="mlp", **kw)(h) * jnp.tanh(mlp_gate).astype(cfg.dtype)
    if xc.skip_tokens_without_image:
      f = jnp.where(keep, f, jnp.zeros((), cfg.dtype))
    x = x + f
    return nn.with_logical_constraint(x, ACTIVATION_AXES), kv


class CrossAttentionGroup(nn.Module):
  """`num_before` LLM layers, one gated cross-attention block, `num_after` LLM layers (one scan step)."""

  config: DecoderConfig
  xattn: CrossAttentionConfig
  num_before: int
  num_after: int

  @nn.compact
  def __call__(self, x, positions, mask, cross_mask, has_keys, memory, cache_index, layer_cache, cross_kv):
    """nn.scan argument order: carry, 6 broadcast args, 2 scanned (per-group KV cache, cached image K/V)."""
    cfg = self.config
    layer_cls = maybe_remat(DecoderLayer, cfg.remat_policy, scanned=True)
    block_cls = maybe_remat(GatedCrossAttention, cfg.remat_policy, scanned=True)
    new_cache = {}
    for name, count in (("layers_before", self.num_before), ("layers_after", self.num_after)):
      if name == "layers_after":
        x, cross_kv = block_cls(cfg, self.xattn, name="cross_attn")(x, cross_mask, has_keys, memory, cross_kv)
      if count:
        stack = scan_layers(layer_cls, count, num_broadcast=3, num_scanned=1)
        part = None if layer_cache is None else layer_cache[name]
        x, new_cache[name] = stack(cfg, name=name)(x, positions, mask, cache_index, part)
    # Image K/V leave the scan only when they were computed here and a cache will keep them.
    keep_kv = memory is not None and layer_cache is not None
    return x, (None if layer_cache is None else new_cache, cross_kv if keep_kv else None)


class CrossAttentionDecoderStack(nn.Module):
  """The LLM's layers with a gated cross-attention block before layer g*every + offset (module docstring)."""

  config: DecoderConfig
  xattn: CrossAttentionConfig

  @nn.compact
  def __call__(
    self,
    x,
    positions,
    mask,
    cache=None,
    cache_index=None,
    *,
    memory=None,
    cross_mask=None,
    has_keys=None,
    cross_kv=None,
  ):
    """Returns (x, updated layer cache or None, per-block image K/V {"k", "v": [G, B, S, ...]} or None)."""
    cfg, xc = self.config, self.xattn
    num_groups, every, offset = xc.num_blocks(cfg.num_layers), xc.every, xc.resolved_offset
    if cfg.scan_layers:
      group_cache = None if cache is None else split_layer_groups(cache, xc, cfg.num_layers)
      group_cls = nn.scan(
        CrossAttentionGroup,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * 6 + (0, 0),
        length=num_groups,
        metadata_params={nn.PARTITION_NAME: GROUP_AXIS},
      )
      x, (group_cache, cross_kv) = group_cls(cfg, xc, offset, every - offset, name="groups")(
        x, positions, mask, cross_mask, has_keys, memory, cache_index, group_cache, cross_kv
      )
      cache = None if cache is None else merge_layer_groups(group_cache, xc, cfg.num_layers)
      return x, cache, cross_kv
    layer_cls = maybe_remat(DecoderLayer, cfg.remat_policy, scanned=False)
    block_cls = maybe_remat(GatedCrossAttention, cfg.remat_policy, scanned=False)
    blocks = {p: g for g, p in enumerate(xc.positions(cfg.num_layers))}
    new_cache, new_kv = [], []
    for i in range(cfg.num_layers + 1):
      if i in blocks:
        g = blocks[i]
        kv = None if cross_kv is None else jax.tree.map(lambda c: c[g], cross_kv)
        x, kv = block_cls(cfg, xc, name=f"cross_attn_{g}")(x, cross_mask, has_keys, memory, kv)
        new_kv.append(kv)
      if i < cfg.num_layers:
        layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
        x, layer_cache = layer_cls(cfg, name=f"layers_{i}")(x, positions, mask, cache_index, layer_cache)
        new_cache.append(layer_cache)
    if cache is not None:
      cache = jax.tree.map(lambda *c: jnp.stack(c), *new_cache)
    keep_kv = memory is not None and cache is not None
    cross_kv = jax.tree.map(lambda *c: jnp.stack(c), *new_kv) if keep_kv else None
    return x, cache, cross_kv


def split_layer_groups(stacked, xc: CrossAttentionConfig, num_layers: int):
  """{...: [L, ...]} -> {stack name: {...: [G, stack length, ...]}} by CrossAttentionConfig.group_parts."""
  grouped = jax.tree.map(lambda c: c.reshape((xc.num_blocks(num_layers), xc.every) + c.shape[1:]), stacked)
  parts = xc.group_parts().items()
  return {name: jax.tree.map(lambda c, lo=lo, hi=hi: c[:, lo:hi], grouped) for name, (lo, hi) in parts}


def merge_layer_groups(grouped, xc: CrossAttentionConfig, num_layers: int):
  """The inverse of split_layer_groups: {stack name: [G, n, ...]} -> [L, ...]."""
  merged = jax.tree.map(lambda *p: jnp.concatenate(p, axis=1), *(grouped[n] for n in xc.group_parts()))
  return jax.tree.map(lambda c: c.reshape((xc.num_blocks(num_layers) * xc.every,) + c.shape[2:]), merged)


class CrossAttentionLM(CausalLM):
  """CausalLM whose decoder interleaves gated cross-attention blocks (param tree: module docstring).

  Same embed / final_norm / lm_head params and the same call protocol as CausalLM, plus `cross`: the
  image stream built by nvlm_jax.fusion.cross_attention_inputs, a dict with
    memory    [B, S, D]      keys/values source (tile tag embeddings + image tokens), or None
    mask      [B, 1, L, S]   bool, which keys each token may see
    has_keys  [B, L]         bool, rows with at least one visible key
    visible   [B, S]         bool, keys visible to tokens after this call (stored in the cache)
  """

  xattn: CrossAttentionConfig = CrossAttentionConfig()

  def _make_decoder(self) -> nn.Module:
    return CrossAttentionDecoderStack(self.config, self.xattn)

  def __call__(
    self,
    input_ids=None,
    *,
    inputs_embeds=None,
    positions=None,
    segment_ids=None,
    cache: Cache | None = None,
    cross: CrossInputs | None = None,
    logits_to_keep: int = 0,
  ):
    hidden, cache = self.hidden_states(
      input_ids, inputs_embeds=inputs_embeds, positions=positions, segment_ids=segment_ids, cache=cache, cross=cross
    )
    logits = self.logits(keep_last(hidden, logits_to_keep))
    return logits if cache is None else (logits, cache)

  def hidden_states(
    self,
    input_ids=None,
    *,
    inputs_embeds=None,
    positions=None,
    segment_ids=None,
    cache: Cache | None = None,
    cross: CrossInputs | None = None,
  ):
    x, positions, segment_ids = self._decoder_inputs(input_ids, inputs_embeds, positions, segment_ids, cache)
    fresh = cross is not None and cross.get("memory") is not None
    if cache is None:
      kwargs = _cross_kwargs(cross) if fresh else {}
      x, _, _ = self.decoder(x, positions, CausalSegments(segment_ids), **kwargs)
      return x, None
    mask, valid = self._cached_mask(cache, segment_ids)
    stored = cache.get("cross")
    if fresh:  # this call brings images: project them once, keep them for the following calls
      kwargs = _cross_kwargs(cross)
    elif stored is not None:  # later calls: every stored key the prompt left visible
      batch, length = segment_ids.shape
      visible = stored["visible"]
      kwargs = dict(
        cross_kv={"k": stored["k"], "v": stored["v"]},
        cross_mask=jnp.broadcast_to(visible[:, None, None, :], (batch, 1, length, visible.shape[1])),
        has_keys=jnp.broadcast_to(jnp.any(visible, axis=1)[:, None], (batch, length)),
      )
    else:
      kwargs = {}
    x, layer_cache, cross_kv = self.decoder(x, positions, mask, cache["layers"], cache["index"], **kwargs)
    new_cache = self._advance_cache(cache, layer_cache, valid, x.shape[1])
    if fresh:
      dtype = stored["k"].dtype if stored is not None else self.config.dtype
      new_cache["cross"] = {
        "k": cross_kv["k"].astype(dtype),
        "v": cross_kv["v"].astype(dtype),
        "visible": cross["visible"],
      }
    return x, new_cache

  def init_cache(self, batch_size: int, max_length: int, dtype: str | None = None, num_keys: int = 0) -> Cache:
    """CausalLM's cache + room for `num_keys` image keys per block (0: the prefill call sizes it)."""
    cache = super().init_cache(batch_size, max_length, dtype)
    heads, kv_heads, head_dim = self.xattn.heads(self.config)
    shape = (self.xattn.num_blocks(self.config.num_layers), batch_size, num_keys, kv_heads, head_dim)
    dtype = dtype or self.config.dtype
    cache["cross"] = {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "visible": jnp.zeros((batch_size, num_keys), bool),
    }
    return cache


def _cross_kwargs(cross: CrossInputs) -> dict:
  return dict(memory=cross["memory"], cross_mask=cross["mask"], has_keys=cross["has_keys"])
