"""flat_matmul (the one matmul behind every Dense) equals the N-D dot_general it replaces, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nvlm_jax.layers.linear import flat_matmul


@pytest.mark.parametrize(
  "x_shape,kernel_shape,contract_dims",
  [
    ((2, 7, 12), (12, 3, 4), 1),  # q_proj: [B, L, E] x [E, heads, head_dim]
    ((2, 7, 3, 4), (3, 4, 12), 2),  # o_proj: [B, L, heads, head_dim] x [heads, head_dim, E]
    ((5, 12), (12, 6), 1),  # plain 2-D
  ],
)
def test_flat_matmul_matches_dot_general(x_shape, kernel_shape, contract_dims):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
  nd = len(x_shape)

  def reference(x, kernel):
    return lax.dot_general(x, kernel, ((tuple(range(nd - contract_dims, nd)), tuple(range(contract_dims))), ((), ())))

  def loss(fn):
    return lambda x, kernel: jnp.sum(jnp.sin(fn(x, kernel)))

  ours = lambda x, kernel: flat_matmul(x, kernel, contract_dims)
  with jax.default_matmul_precision("highest"):
    y, y_ref = ours(x, kernel), reference(x, kernel)
    grads = jax.grad(loss(ours), argnums=(0, 1))(x, kernel)
    grads_ref = jax.grad(loss(reference), argnums=(0, 1))(x, kernel)
  assert y.shape == x_shape[: nd - contract_dims] + kernel_shape[contract_dims:]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
