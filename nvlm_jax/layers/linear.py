"""Dense projections written as explicit kernels + einsum-style dot_general (MaxText style).

Multi-dimensional features (e.g. [heads, head_dim]) keep their own axes, so each one gets its own
logical axis name and can be sharded independently. Parameters are stored in `param_dtype` and cast
to the compute `dtype` at use.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

default_kernel_init = nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
  """y = x . W (+ b), contracting the last `contract_dims` input dims against the kernel's first ones.

  Kernel shape: x.shape[-contract_dims:] + features. `kernel_axes` names every kernel dim.
  """

  features: int | Sequence[int]
  kernel_axes: Sequence[str]
  contract_dims: int = 1
  use_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.contract_dims:]
    kernel_shape = tuple(in_shape) + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f"{self.name}: kernel_axes {tuple(self.kernel_axes)} do not match kernel shape {kernel_shape}")
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
        kernel_shape, jnp.dtype(self.param_dtype))
    x = x.astype(self.dtype)
    batch_contract = tuple(range(x.ndim - self.contract_dims, x.ndim))
    y = lax.dot_general(x, kernel.astype(self.dtype),
                        ((batch_contract, tuple(range(self.contract_dims))), ((), ())))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.kernel_axes[self.contract_dims:])),
          features, jnp.dtype(self.param_dtype))
      y = y + bias.astype(self.dtype)
    return y


class Embedding(nn.Module):
  """Token embedding table [vocab, embed]; `attend` reuses it as a tied output projection."""

  num_embeddings: int
  features: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(default_kernel_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.dtype(self.param_dtype))

  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))
