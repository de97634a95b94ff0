"""Dense projections written as explicit kernels (MaxText style), each applied as one 2-D matmul.

Multi-dimensional features (e.g. [heads, head_dim]) keep their own kernel axes, so each one gets its own
logical axis name and can be sharded independently; only the matmul itself sees them merged. Parameters
are stored in `param_dtype` and cast to the compute `dtype` at use.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

default_kernel_init = nn.initializers.normal(stddev=0.02)


def flat_matmul(x: jnp.ndarray, kernel: jnp.ndarray, contract_dims: int) -> jnp.ndarray:
  """x [..., K...] . kernel [K..., F...] -> [..., F...], computed as ONE 2-D [N, K] x [K, F] matmul.

  Same math as a dot_general over the trailing dims, but its gradient is also plain 2-D matmuls. Autodiff
  of the N-D form gives weight gradients that contract two dims at once (batch and length), which XLA's
  CPU backend lowers with large transposed copies: this form made a SwiGLU block's fwd + bwd about 25%
  faster there (bench/README.md). The reshapes only merge or split adjacent dims (free in row-major layout).
  """
  lead, contract = x.shape[: x.ndim - contract_dims], x.shape[x.ndim - contract_dims :]
  features = kernel.shape[contract_dims:]
  k, n = math.prod(contract), math.prod(features)
  y = lax.dot(x.reshape(-1, k), kernel.reshape(k, n))
  return y.reshape(lead + features)


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
    in_shape = x.shape[x.ndim - self.contract_dims :]
    kernel_shape = tuple(in_shape) + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f"{self.name}: kernel_axes {tuple(self.kernel_axes)} do not match kernel shape {kernel_shape}")
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
      kernel_shape,
      jnp.dtype(self.param_dtype),
    )
    y = flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.contract_dims)
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.kernel_axes[self.contract_dims :])),
        features,
        jnp.dtype(self.param_dtype),
      )
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
      "embedding",
      nn.with_logical_partitioning(default_kernel_init, ("vocab", "embed")),
      (self.num_embeddings, self.features),
      jnp.dtype(self.param_dtype),
    )

  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))
