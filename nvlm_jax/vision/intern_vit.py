"""InternViT, the NVLM vision encoder (docs/paper.md a.1; InternViT-6B-448px-V1-5 at full size).

    tile [N, H, W, 3] -> 14px patches -> Linear (the conv, as an einsum) -> [cls] + patches + positions
      -> num_layers x { x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x)) }   (no final norm)
      -> hidden state `select_layer` -> drop the class token -> [N, grid^2, hidden]

Attention is bidirectional. With `qk_normalization`, q and k are RMS-normalized over the full hidden
width (all heads together, one statistic per token), not per head; the scale is stored as
[heads, head_dim] so it shards with the heads.

Parameter layout (under `embeddings/` and `encoder/layers/`, layer params stacked on a leading axis when
scanned): patch_embedding/{kernel [p, p, 3, D], bias [D]}, class_embedding [D], position_embedding
[1 + grid^2, D]; per layer: norm1, attn/{q_proj, k_proj, v_proj}/kernel [D, heads, head_dim],
attn/{q_norm, k_norm}/scale [heads, head_dim], attn/proj/{kernel [heads, head_dim, D], bias [D]}, ls1 [D],
norm2, mlp/{fc1, fc2}/{kernel, bias}, ls2 [D]. The HF fused `qkv` is split by the importer.

The 25 heads of InternViT-6B do not divide a tensor-parallel axis of 8 (Megatron padded them with 7 zero
heads, docs/paper.md a.2); our heads carry the logical name "vision_heads", which the default rules keep
unsharded, while the MLP (12800) shards over "tensor" and the model dim over "fsdp".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvlm_jax.config import VisionConfig
from nvlm_jax.layers.attention import attend
from nvlm_jax.layers.attention_impl import choose_attention_impl, log_choice_once
from nvlm_jax.layers.linear import Dense, default_kernel_init
from nvlm_jax.layers.mlp import GeluMLP
from nvlm_jax.layers.norms import make_norm
from nvlm_jax.layers.remat import maybe_remat
from nvlm_jax.layers.scan import scan_layers

ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")
HEAD_AXES = ("activation_batch", "activation_length", "activation_vision_heads", None)


class VisionEmbeddings(nn.Module):
  """Non-overlapping conv patch embedding (with bias), class token, learned absolute positions."""

  config: VisionConfig

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    n, height, width, channels = pixels.shape
    if (height, width, channels) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(
        f"InternViT expects channels-last tiles [N, {cfg.image_size}, {cfg.image_size}, "
        f"{cfg.num_channels}], got {pixels.shape}"
      )
    p, g = cfg.patch_size, cfg.grid_size
    # A stride-p, kernel-p conv is a matmul over each p x p x C patch: [N, g, g, p, p, C] . [p, p, C, D].
    patches = pixels.reshape(n, g, p, g, p, channels).transpose(0, 1, 3, 2, 4, 5)
    x = Dense(
      cfg.hidden_size,
      (None, None, None, "embed"),
      contract_dims=3,
      use_bias=True,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name="patch_embedding",
    )(patches)
    x = x.reshape(n, g * g, cfg.hidden_size)
    if cfg.use_class_token:
      cls = self.param(
        "class_embedding",
        nn.with_logical_partitioning(default_kernel_init, ("embed",)),
        (cfg.hidden_size,),
        jnp.dtype(cfg.param_dtype),
      )
      cls = jnp.broadcast_to(cls.astype(cfg.dtype), (n, 1, cfg.hidden_size))
      x = jnp.concatenate([cls, x], axis=1)
    pos = self.param(
      "position_embedding",
      nn.with_logical_partitioning(default_kernel_init, (None, "embed")),
      (cfg.num_positions, cfg.hidden_size),
      jnp.dtype(cfg.param_dtype),
    )
    return x + pos.astype(cfg.dtype)[None]


class FullWidthRMSNorm(nn.Module):
  """RMSNorm of [..., heads, head_dim] over heads and head_dim together (InternViT's q/k norm)."""

  epsilon: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("vision_heads", "head_dim")),
      x.shape[-2:],
      jnp.dtype(self.param_dtype),
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True) + self.epsilon)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class VisionAttention(nn.Module):
  """Bidirectional multi-head attention; separate q/k/v kernels, optional full-width q/k RMSNorm."""

  config: VisionConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    heads = (cfg.num_heads, cfg.head_dim)
    axes = ("embed", "vision_heads", "head_dim")
    q = Dense(heads, axes, use_bias=cfg.qkv_bias, name="q_proj", **kw)(x)
    k = Dense(heads, axes, use_bias=cfg.qkv_bias, name="k_proj", **kw)(x)
    v = Dense(heads, axes, use_bias=cfg.qkv_bias, name="v_proj", **kw)(x)
    if cfg.qk_normalization:
      q = FullWidthRMSNorm(cfg.layer_norm_eps, name="q_norm", **kw)(q)
      k = FullWidthRMSNorm(cfg.layer_norm_eps, name="k_norm", **kw)(k)
    q = nn.with_logical_constraint(q, HEAD_AXES)
    impl = choose_attention_impl(
      cfg.attention_impl,
      jax.default_backend(),
      "full",
      q_len=q.shape[1],
      k_len=k.shape[1],
      head_dim=cfg.head_dim,
      dtype=cfg.dtype,
    )
    log_choice_once("ViT attention", cfg.attention_impl, "full", impl)
    out = attend(impl, q, k, v, None)
    out = nn.with_logical_constraint(out, HEAD_AXES)
    return Dense(
      cfg.hidden_size, ("vision_heads", "head_dim", "embed"), contract_dims=2, use_bias=True, name="proj", **kw
    )(out)


class VisionEncoderLayer(nn.Module):
  """x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x)).

  `layer_index` (scanned in) lets layers past `config.depth` pass x through unchanged, which is how a
  non-final `select_layer` works while the parameter tree keeps every checkpoint layer.
  """

  config: VisionConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, layer_index=None):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    layer_scale = nn.with_logical_partitioning(nn.initializers.constant(cfg.layer_scale_init), ("norm",))
    ls1 = self.param("ls1", layer_scale, (cfg.hidden_size,), jnp.dtype(cfg.param_dtype))
    ls2 = self.param("ls2", layer_scale, (cfg.hidden_size,), jnp.dtype(cfg.param_dtype))
    inputs = x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    h = make_norm(cfg.norm_type, cfg.layer_norm_eps, name="norm1", **kw)(x)
    x = x + VisionAttention(cfg, name="attn")(h) * ls1.astype(cfg.dtype)
    h = make_norm(cfg.norm_type, cfg.layer_norm_eps, name="norm2", **kw)(x)
    x = x + GeluMLP(cfg.hidden_size, cfg.intermediate_size, name="mlp", **kw)(h) * ls2.astype(cfg.dtype)
    if cfg.depth < cfg.num_layers:
      x = jnp.where(layer_index < cfg.depth, x, inputs)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), None


class VisionEncoder(nn.Module):
  """num_layers encoder layers, scanned (params under `layers`) or unrolled (`layers_{i}`)."""

  config: VisionConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    layer_cls = maybe_remat(VisionEncoderLayer, cfg.remat_policy, cfg.scan_layers)
    if cfg.scan_layers:
      stack = scan_layers(layer_cls, cfg.num_layers, num_broadcast=0, num_scanned=1)
      x, _ = stack(cfg, name="layers")(x, jnp.arange(cfg.num_layers, dtype=jnp.int32))
      return x
    for i in range(cfg.num_layers):
      x, _ = layer_cls(cfg, name=f"layers_{i}")(x, jnp.asarray(i, jnp.int32))
    return x


class InternViT(nn.Module):
  """pixels [N, H, W, C] (channels last, normalized) -> features [N, grid^2, hidden] (class token dropped)."""

  config: VisionConfig

  @nn.compact
  def __call__(self, pixels: jnp.ndarray, *, keep_class_token: bool = False) -> jnp.ndarray:
    cfg = self.config
    x = VisionEmbeddings(cfg, name="embeddings")(pixels)
    x = VisionEncoder(cfg, name="encoder")(x)
    if cfg.use_class_token and not keep_class_token:
      x = x[:, 1:]
    return x
