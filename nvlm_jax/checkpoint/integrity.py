"""Checksums that tell an intact checkpoint from a damaged one.

orbax restores whatever bytes are on disk: flipped bits in a params file load without complaint and
show up steps later as NaNs blamed on the data. So every save also writes an `integrity` item: a
digest of every array of the train state, computed on the devices from the arrays' bit patterns, and
a digest of each process's data-iterator state. A restore recomputes the digests of what it read and
refuses the checkpoint on any difference, naming the arrays.

Array digest: the elements' bit patterns as uint32 words w_i at flat positions i, reduced to
(sum w_i, sum w_i * (2 i + 1)) mod 2^32. Integer sums are exact whatever the reduction order, so the
digest is the same on any mesh (a checkpoint restored onto other shardings verifies); any single
changed element changes the first sum, and moved elements change the second. It is a guard against
damage, not against someone forging a checkpoint.
"""

from __future__ import annotations

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

INTEGRITY_ITEM = "integrity"
FORMAT = 1


def _words(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as one uint32."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = jnp.dtype(x.dtype).itemsize * 8
  if bits not in (8, 16, 32):
    raise TypeError(f"no checksum for dtype {x.dtype} (64-bit arrays are not part of a train state)")
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every element mod 2^32, built from iotas (no reshape: stays sharded)."""
  pos = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return pos


def _digest(x: jax.Array) -> jax.Array:
  w = _words(x)
  weights = _positions(x.shape) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weights, dtype=jnp.uint32)])


def _digests_and_finite(tree, params):
  digests = jax.tree.map(_digest, tree)
  floats = [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params) if jnp.issubdtype(p.dtype, jnp.floating)]
  finite = jnp.all(jnp.stack(floats)) if floats else jnp.bool_(True)
  return digests, finite


_JITTED: dict = {}


def _mesh_of(tree):
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def array_digests(tree, params=None) -> tuple[dict[str, str], bool]:
  """({array path: 16 hex digits}, whether every float leaf of `params` is finite), computed on device."""
  mesh = _mesh_of(tree)
  if mesh not in _JITTED:
    out = NamedSharding(mesh, P()) if mesh is not None else None
    _JITTED[mesh] = jax.jit(_digests_and_finite, out_shardings=out)
  digests, finite = jax.device_get(_JITTED[mesh](tree, params if params is not None else {}))
  named = {
    jax.tree_util.keystr(path): f"{int(d[0]):08x}{int(d[1]):08x}"
    for path, d in jax.tree_util.tree_flatten_with_path(digests)[0]
  }
  return named, bool(finite)


def data_state_digest(state) -> str:
  """Digest of a grain iterator state (a dict, or the JSON bytes a DataLoader iterator gives)."""
  if isinstance(state, (bytes, bytearray)):
    state = state.decode()
  if isinstance(state, str):
    state = json.loads(state)
  return f"{zlib.crc32(json.dumps(state, sort_keys=True).encode()):08x}"


def gather_data_digests(data_iterator) -> list[str] | None:
  """Every process's data-iterator digest (a collective; in process order), or None without an iterator."""
  if data_iterator is None:
    return None
  mine = int(data_state_digest(data_iterator.get_state()), 16)
  if jax.process_count() == 1:
    return [f"{mine:08x}"]
  from jax.experimental import multihost_utils

  every = multihost_utils.process_allgather(np.asarray([mine], np.uint32))
  return [f"{int(v):08x}" for v in np.asarray(every).reshape(-1)]


def record(step: int, array_digest: dict[str, str], data_digests: list[str] | None, items: list[str]) -> dict:
  return {"format": FORMAT, "step": int(step), "items": sorted(items), "arrays": array_digest, "data": data_digests}


def mismatched_arrays(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
  """Array paths whose digest differs (or that only one side has)."""
  return sorted(k for k in set(saved) | set(restored) if saved.get(k) != restored.get(k))
