"""Device mesh, the logical-axis rules table, and sharded initialization.

Every parameter and large activation carries logical axis names ("embed", "heads", ...). One rules
table maps them onto the mesh axes `data`, `fsdp` and `tensor`. Changing the parallelism layout means
changing the mesh shape or this table, never the model code.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axes). Weights: the model dim is split over fsdp, the "wide" dims (heads, mlp,
# vocab) over tensor (Megatron-style tensor parallelism). Activations: batch over data x fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  # activations
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("activation_tiles", None),
  ("activation_vision_heads", None),  # see "vision_heads"
  # parameters
  ("layers", None),
  ("layer_groups", None),  # NVLM-X/H: groups of decoder layers + one cross-attention block
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  # InternViT-6B has 25 heads, not divisible by tensor-parallel degrees 2/4/8 (docs/paper.md a.2): unsharded by
  # default; its MLP ("mlp", 12800 wide) and model dim ("embed") still shard.
  ("vision_heads", None),
  ("mlp", "tensor"),
  ("norm", None),
)


def checked_rules(rules, where: str = "sharding rules") -> tuple[tuple[str, Any], ...]:
  """A logical-axis rules table as tuples, each entry (logical name, mesh axis | tuple of mesh axes | None);
  ValueError names the entry that is not."""
  out = []
  for i, rule in enumerate(rules):
    rule = tuple(rule) if isinstance(rule, (list, tuple)) else (rule,)
    target = rule[1] if len(rule) == 2 else "?"
    axes = target if isinstance(target, (list, tuple)) else () if target is None else (target,)
    if len(rule) != 2 or not isinstance(rule[0], str) or any(a not in MESH_AXES for a in axes):
      raise ValueError(
        f"{where}[{i}] = {rule!r}: expected (logical axis name, mesh axis or tuple of mesh axes "
        f"or None) with mesh axes in {MESH_AXES}"
      )
    out.append((rule[0], tuple(axes) if isinstance(target, (list, tuple)) else target))
  return tuple(out)


def parse_mesh(text: str, *, allow_rest: bool = True) -> dict[str, int]:
  """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2}, for every command's --mesh; ValueError names the bad entry.

  allow_rest: one size may be -1 (create_mesh gives that axis the remaining devices).
  """
  mesh = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, size = (x.strip() for x in part.partition("="))
    try:
      value = int(size)
    except ValueError:
      value = 0
    if not sep or name not in MESH_AXES or not (value >= 1 or (allow_rest and value == -1)):
      sizes = "a positive integer" + (" or -1 (the remaining devices)" if allow_rest else "")
      raise ValueError(
        f"--mesh {text!r}: entry {part!r}: expected AXIS=SIZE with AXIS in {', '.join(MESH_AXES)} "
        f"and SIZE {sizes}, e.g. fsdp=4,tensor=2"
      )
    mesh[name] = value
  return mesh


def create_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices.

  Axis types are Auto: linen's logical constraints and scanned carries need it (jax 0.10 defaults
  `jax.make_mesh` to Explicit).
  """
  devices = list(jax.devices() if devices is None else devices)
  dims = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
  if len(dims) != len(MESH_AXES):
    raise ValueError(f"mesh shape {dims} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  named = dict(zip(MESH_AXES, dims))
  if any(not isinstance(d, (int, np.integer)) or (d < 1 and d != -1) for d in dims):
    raise ValueError(f"mesh axes {named}: every axis must be a positive integer (or -1 for the rest)")
  if dims.count(-1) > 1:
    raise ValueError(f"mesh axes {named}: at most one axis may be -1")
  if -1 in dims:
    known = int(np.prod([d for d in dims if d != -1]))
    if len(devices) % known:
      fixed = {a: d for a, d in named.items() if d != -1}
      raise ValueError(
        f"mesh axes {named}: the fixed axes {fixed} multiply to {known}, which does not divide "
        f"the {len(devices)} device(s); choose sizes whose product divides {len(devices)}"
      )
    dims[dims.index(-1)] = len(devices) // known
  if int(np.prod(dims)) != len(devices):
    product = int(np.prod(dims))
    raise ValueError(
      f"mesh axes {named} multiply to {product}: needs {product} devices, found {len(devices)}; "
      "the product must equal the device count (or set one axis to -1)"
    )
  grid = np.asarray(devices, dtype=object).reshape(dims)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(shapes: Any, shardings: Any, logical_specs: Any) -> None:
  """Raises ValueError naming the first parameter whose dimension the mesh cannot split evenly (jax would
  raise a bare IndivisibleError at the first jit), its logical axis, the mesh axes and their sizes."""
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  flat_logical = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
  for (path, shape), sharding, logical in zip(flat_shapes, flat_shardings, flat_logical):
    for dim, (size, axes) in enumerate(zip(shape.shape, sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      parts = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
      if size % parts:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        split = " x ".join(f"{a}={sharding.mesh.shape[a]}" for a in axes)
        logical_name = logical[dim] if dim < len(logical) else None
        raise ValueError(
          f"mesh {dict(sharding.mesh.shape)}: parameter {name} {tuple(shape.shape)} has "
          f"dimension {dim} (logical axis {logical_name!r}) of size {size}, which mesh axes {split} "
          f"cannot split into {parts} equal parts; choose mesh sizes that divide it"
        )


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args, rules=LOGICAL_AXIS_RULES):
  """Runs a flax `init_fn(*args)` so every parameter is created already sharded.

  `jax.eval_shape` gives the logical partitioning without allocating; the real init is then jitted
  with those out_shardings, so no parameter ever exists whole on one device.
  Returns (unboxed variables, their NamedShardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)
  unboxed_init = lambda *a: nn.meta.unbox(init_fn(*a))
  with nn.logical_axis_rules(rules):
    variables = jax.jit(unboxed_init, out_shardings=shardings)(*args)
  return variables, shardings


def shardings_for(abstract_variables: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for the (boxed) abstract variables of a model, e.g. from `jax.eval_shape(init)`."""
  return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)
