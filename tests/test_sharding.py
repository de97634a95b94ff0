"""The decoder on an fsdp x tensor mesh of 8 virtual CPU devices equals the single-device decoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nvlm_jax import sharding
from nvlm_jax.config import DecoderConfig
from nvlm_jax.language.decoder import CausalLM

CONFIG = DecoderConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS before jax loads)")
  return sharding.create_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])


def test_create_mesh_fills_the_wildcard_axis_and_rejects_bad_shapes():
  devices = jax.devices()[:8]
  assert sharding.create_mesh({"fsdp": -1, "tensor": 2}, devices).shape == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="needs 6 devices, found 8"):
    sharding.create_mesh({"fsdp": 3, "tensor": 2}, devices)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_sharded_forward_equals_single_device(mesh, scan_layers):
  model = CausalLM(CONFIG.replace(scan_layers=scan_layers))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, CONFIG.vocab_size, (4, 96)), jnp.int32)
  rng = jax.random.key(0)

  params, param_shardings = sharding.init_sharded(lambda r: model.init(r, ids), mesh, rng)
  reference_params = jax.device_get(params)
  expected = model.apply(reference_params, ids)

  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    forward = jax.jit(model.apply, in_shardings=(param_shardings, batch_sharding))
    logits = forward(params, jax.device_put(ids, batch_sharding))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)

  # Every parameter is really laid out the way the rules table says.
  abstract = jax.eval_shape(lambda r: model.init(r, ids), rng)
  specs = nn.get_partition_spec(abstract)
  rules = dict(sharding.LOGICAL_AXIS_RULES)
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
  assert len(flat_specs) == len(flat_params)
  for path, logical in flat_specs:
    array = flat_params[path]
    expected_spec = P(*(rules.get(name) if name else None for name in logical))
    assert array.sharding.is_equivalent_to(NamedSharding(mesh, expected_spec), array.ndim), (
      jax.tree_util.keystr(path),
      array.sharding.spec,
      expected_spec,
    )
    shard_shape = array.sharding.shard_shape(array.shape)
    if "tensor" in str(expected_spec) or "fsdp" in str(expected_spec):
      assert shard_shape != array.shape, f"{jax.tree_util.keystr(path)} is not split: {shard_shape}"
