"""The vision -> LLM projector applied to pixel-shuffled ViT features (docs/paper.md c.2).

Two layers (NVLM-D/H `mlp1`, transformers InternVL `multi_modal_projector`):
    LayerNorm -> Linear(in, hidden) -> GELU (exact erf) -> Linear(hidden, out)
One layer (NVLM-X): LayerNorm -> Linear(in, out). See `ProjectorConfig` for the shapes of each model.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from nvlm_jax.config import ProjectorConfig
from nvlm_jax.layers.linear import Dense
from nvlm_jax.layers.norms import LayerNorm


class Projector(nn.Module):
  """[..., in_features] -> [..., out_features]; params `norm`, `linear_1` (+ `linear_2`)."""

  config: ProjectorConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    if x.shape[-1] != cfg.in_features:
      raise ValueError(f"projector expects {cfg.in_features} input features, got shape {x.shape}")
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.use_bias)
    x = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(x)
    if cfg.num_layers == 1:
      return Dense(cfg.out_features, ("embed", "mlp"), name="linear_1", **kw)(x)
    h = nn.gelu(Dense(cfg.hidden_size, ("embed", "mlp"), name="linear_1", **kw)(x), approximate=False)
    if h.ndim == 3:
      h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    return Dense(cfg.out_features, ("mlp", "embed"), name="linear_2", **kw)(h)
