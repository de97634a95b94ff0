"""Declarative, bidirectional HF <-> flax parameter maps.

A `Rule` ties one or more HF tensors (key templates, `{layer}` for per-layer keys) to one or more of
our parameters (paths "a/b/kernel", `{layer}` likewise) through a pair of pure numpy functions:
`to_flax(*hf_arrays) -> params` and `to_hf(*params) -> hf_arrays`. Both sides' shapes are derived from
the model config when the rule is built, so every tensor is checked before anything is read. Most
rules are one-to-one (`rename`, `linear`, `bias`); many-to-one/one-to-many rules (a fused qkv split
into q/k/v) use `Rule` directly.

Per-layer rules expand over `range(num_layers)`. With `scan=True` the per-layer params are stacked on
a leading axis: the path's `_{layer}` suffix is dropped ("decoder/layers_{layer}/x" ->
"decoder/layers/x"), matching the names nn.scan (`name="layers"`) and an unrolled loop
(`name=f"layers_{i}"`) give.

A `RuleTable` is a tuple of rules plus ignore patterns. Tables compose with `+` and re-root with
`with_prefix`, so a multimodal layout is the vision table + projector table + the LLM table under
`language_model.` / `language_model/`.

Loading reads one HF tensor at a time (memory-mapped), converts it, casts it to the target dtype and
places it on its target sharding; a stacked param is assembled on the devices from per-layer pieces,
so neither host nor any single device ever holds more than one layer of one param beyond its share.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nvlm_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint

Shape = tuple[int, ...]
LAYER = "{layer}"
_MAX_LISTED = 20


def _fmt_list(items: Sequence[str]) -> str:
  shown = "\n  ".join(items[:_MAX_LISTED])
  more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"\n  {shown}{more}"


def _concrete(template: str, layer: int | None) -> str:
  return template if layer is None else template.replace(LAYER, str(layer))


@dataclasses.dataclass(frozen=True)
class Rule:
  """HF tensors `hf_keys` <-> our params `param_paths`, with per-layer shapes and the two transforms.

  to_flax(*arrays in hf_keys order) -> tuple of arrays in param_paths order; to_hf the inverse.
  param_shapes are per layer (without the stacked axis).
  """

  hf_keys: tuple[str, ...]
  param_paths: tuple[str, ...]
  hf_shapes: tuple[Shape, ...]
  param_shapes: tuple[Shape, ...]
  to_flax: Callable[..., tuple[np.ndarray, ...]]
  to_hf: Callable[..., tuple[np.ndarray, ...]]
  num_layers: int | None = None  # per-layer rule: expanded for layer in range(num_layers)
  scan: bool = False  # per-layer params stacked on a leading axis

  def __post_init__(self):
    if len(self.hf_keys) != len(self.hf_shapes) or len(self.param_paths) != len(self.param_shapes):
      raise ValueError(f"rule {self.hf_keys} -> {self.param_paths}: one shape per key/path is required")
    per_layer = [LAYER in t for t in self.hf_keys + self.param_paths]
    if self.num_layers is not None and not all(per_layer):
      raise ValueError(f"per-layer rule {self.hf_keys} -> {self.param_paths}: every template needs {LAYER}")
    if self.scan and any(f"_{LAYER}" not in p for p in self.param_paths):
      raise ValueError(f"scanned rule {self.param_paths}: param paths need a '_{LAYER}' segment to drop")

  @property
  def layers(self) -> Sequence[int | None]:
    return [None] if self.num_layers is None else range(self.num_layers)

  def keys_at(self, layer: int | None) -> tuple[str, ...]:
    return tuple(_concrete(k, layer) for k in self.hf_keys)

  def paths_at(self, layer: int | None) -> tuple[str, ...]:
    return tuple(_concrete(p, layer) for p in self.param_paths)

  @property
  def stacked_paths(self) -> tuple[str, ...]:
    return tuple(p.replace(f"_{LAYER}", "") for p in self.param_paths)

  def target_paths(self) -> dict[str, Shape]:
    """Our param paths as they appear in the param tree, with full shapes (stacked axis included)."""
    if self.scan:
      return {p: (self.num_layers, *s) for p, s in zip(self.stacked_paths, self.param_shapes)}
    return {p: s for layer in self.layers for p, s in zip(self.paths_at(layer), self.param_shapes)}

  def with_prefix(self, hf_prefix: str = "", param_prefix: str = "") -> "Rule":
    join = lambda p: f"{param_prefix.rstrip('/')}/{p}" if param_prefix else p
    return dataclasses.replace(
      self, hf_keys=tuple(hf_prefix + k for k in self.hf_keys), param_paths=tuple(join(p) for p in self.param_paths)
    )


# ----------------------------------------------------------------------------------------------------
# Rule factories for the common one-to-one cases.


def transpose_2d(x: np.ndarray, tile: int = 256) -> np.ndarray:
  """x.T as a new C-contiguous array, copied tile by tile (2-3x faster than numpy's strided copy on
  large matrices, which matters for a 72B import: every Linear weight is transposed once)."""
  rows, cols = x.shape
  if rows * cols <= tile * tile * 4:
    return np.ascontiguousarray(x.T)
  out = np.empty((cols, rows), x.dtype)
  for i in range(0, rows, tile):
    for j in range(0, cols, tile):
      out[j : j + tile, i : i + tile] = x[i : i + tile, j : j + tile].T
  return out


def _one(fn):
  return lambda *xs: (fn(*xs),)


def rename(hf_key: str, param_path: str, shape: Sequence[int]) -> Rule:
  """Same tensor, new name (norm scales, embeddings, position tables)."""
  shape = tuple(shape)
  return Rule((hf_key,), (param_path,), (shape,), (shape,), _one(lambda x: x), _one(lambda x: x))


def linear(hf_key: str, param_path: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> Rule:
  """torch Linear weight [out, in] <-> our kernel in_shape + out_shape (e.g. [D] -> [heads, head_dim])."""
  in_shape, out_shape = tuple(in_shape), tuple(out_shape)
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Rule(
    (hf_key,),
    (param_path,),
    ((n_out, n_in),),
    (in_shape + out_shape,),
    _one(lambda w: transpose_2d(w.reshape(n_out, n_in)).reshape(in_shape + out_shape)),
    _one(lambda k: transpose_2d(k.reshape(n_in, n_out))),
  )


def bias(hf_key: str, param_path: str, out_shape: Sequence[int]) -> Rule:
  """torch bias [out] <-> our bias out_shape (e.g. [heads, head_dim])."""
  out_shape = tuple(out_shape)
  n_out = math.prod(out_shape)
  return Rule(
    (hf_key,),
    (param_path,),
    ((n_out,),),
    (out_shape,),
    _one(lambda b: b.reshape(out_shape)),
    _one(lambda b: b.reshape(n_out)),
  )


def per_layer(rules: Iterable[Rule], num_layers: int, scan: bool) -> list[Rule]:
  """Marks rules (whose templates use {layer}) as per-layer over `num_layers`, stacked when `scan`."""
  return [dataclasses.replace(r, num_layers=num_layers, scan=scan) for r in rules]


# ----------------------------------------------------------------------------------------------------
# Placement helpers.


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of one layer of a param stacked on axis 0 (the layer axis must be unsharded)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)
    if spec and spec[0] is not None:
      raise CheckpointError(f"stacked layer axis is sharded ({sharding.spec}); loading needs it replicated")
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  return sharding


@functools.lru_cache(maxsize=None)
def _stack_fns(shape: Shape, dtype: np.dtype, sharding: jax.sharding.Sharding):
  """(allocate zeros, write layer i in place) for a stacked param, compiled once per shape/sharding.

  Writing layer by layer into a donated buffer keeps the devices at one stacked param + one layer.
  """
  zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
  write = jax.jit(
    lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0),
    donate_argnums=0,
    out_shardings=sharding,
  )
  return zeros, write


def _backed_by_file(array: np.ndarray) -> bool:
  base = array
  while base is not None:
    if isinstance(base, (np.memmap, mmap.mmap)):
      return True
    base = getattr(base, "base", None)
  return False


def _materialize(array: np.ndarray, dtype) -> np.ndarray:
  """A C-contiguous array in `dtype` that owns its memory (never a view of the mapped file, which a
  device could otherwise alias, and which may change on disk after loading)."""
  if dtype is not None and array.dtype != dtype:
    return np.ascontiguousarray(array.astype(dtype))
  if _backed_by_file(array) or not array.flags.c_contiguous:
    return np.array(array, order="C", copy=True)
  return array


def _put(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """Host array -> device array on `sharding`; each device receives only its own slice."""
  if sharding is None:
    return jax.device_put(array)
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return jax.device_put(array, sharding)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _default_device_sharding():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RuleTable:
  """A complete HF <-> flax map for one checkpoint layout.

  `ignore`: regexes (re.fullmatch) for HF keys that may be present and are skipped (e.g. cached RoPE
  buffers). `name` appears in error messages.
  """

  rules: tuple[Rule, ...]
  ignore: tuple[str, ...] = ()
  name: str = "checkpoint"

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    object.__setattr__(self, "ignore", tuple(self.ignore))
    seen_keys, seen_paths = {}, {}
    for rule in self.rules:
      if rule.num_layers is None and any(LAYER in t for t in rule.hf_keys + rule.param_paths):
        raise ValueError(
          f"{self.name}: rule {rule.hf_keys} -> {rule.param_paths} has {LAYER} but no "
          "num_layers (wrap it with per_layer)"
        )
      for layer in rule.layers:
        for key in rule.keys_at(layer):
          if key in seen_keys:
            raise ValueError(f"{self.name}: HF key {key!r} is claimed by two rules")
          seen_keys[key] = rule
      for path in rule.target_paths():
        if path in seen_paths:
          raise ValueError(f"{self.name}: param {path!r} is produced by two rules")
        seen_paths[path] = rule

  def __add__(self, other: "RuleTable") -> "RuleTable":
    return RuleTable(self.rules + other.rules, self.ignore + other.ignore, f"{self.name}+{other.name}")

  def with_prefix(self, hf_prefix: str = "", param_prefix: str = "") -> "RuleTable":
    """Re-roots every rule: HF keys get `hf_prefix`, param paths get `param_prefix/`."""
    return RuleTable(
      tuple(r.with_prefix(hf_prefix, param_prefix) for r in self.rules),
      tuple(re.escape(hf_prefix) + pat for pat in self.ignore),
      self.name,
    )

  # -- expected contents -------------------------------------------------------------------------

  def hf_shapes(self) -> dict[str, Shape]:
    """Every concrete HF key the table expects -> its shape in the file."""
    return {k: s for r in self.rules for layer in r.layers for k, s in zip(r.keys_at(layer), r.hf_shapes)}

  def param_shapes(self) -> dict[str, Shape]:
    """Every param path the table produces ('/'-joined, as in the model's tree) -> full shape."""
    return {p: s for r in self.rules for p, s in r.target_paths().items()}

  def _ignored(self, key: str) -> bool:
    return any(re.fullmatch(pat, key) for pat in self.ignore)

  def check_checkpoint(self, ckpt: SafetensorsCheckpoint) -> None:
    """Unknown keys, missing keys and shape mismatches, all found from headers before any read."""
    expected = self.hf_shapes()
    unknown = [k for k in ckpt if k not in expected and not self._ignored(k)]
    missing = [k for k in expected if k not in ckpt]
    problems = []
    if unknown:
      problems.append(
        f"{len(unknown)} unknown key(s) in the checkpoint (no rule of {self.name} maps them):"
        + _fmt_list([f"{k!r} ({ckpt.file_of(k)})" for k in unknown])
      )
    if missing:
      problems.append(
        f"{len(missing)} key(s) the {self.name} layout needs are missing from {ckpt.path}:"
        + _fmt_list([repr(k) for k in missing])
      )
    if problems:
      raise CheckpointError(f"{ckpt.path}: checkpoint does not match the {self.name} layout.\n" + "\n".join(problems))
    wrong = [
      f"{k!r} in {ckpt.file_of(k)}: expected shape {tuple(s)}, found {ckpt[k].shape}"
      for k, s in expected.items()
      if tuple(ckpt[k].shape) != tuple(s)
    ]
    if wrong:
      raise CheckpointError(
        f"{ckpt.path}: {len(wrong)} tensor(s) with the wrong shape for the {self.name} "
        "layout (check config.json against the weights):" + _fmt_list(wrong)
      )

  def check_target(self, target: Mapping[str, Any]) -> None:
    """The rules must produce exactly the model's params, with the model's shapes."""
    produced = self.param_shapes()
    extra = [p for p in produced if p not in target]
    unfilled = [p for p in target if p not in produced]
    wrong = [
      f"{p}: rules give {produced[p]}, model has {tuple(target[p].shape)}"
      for p in produced
      if p in target and tuple(target[p].shape) != tuple(produced[p])
    ]
    if extra or unfilled or wrong:
      parts = []
      if unfilled:
        parts.append("model params no rule fills:" + _fmt_list(unfilled))
      if extra:
        parts.append("rule paths the model lacks:" + _fmt_list(extra))
      if wrong:
        parts.append("shape disagreements:" + _fmt_list(wrong))
      raise CheckpointError(
        f"rule table {self.name} does not match the model's params (a rule table bug or a "
        "config mismatch):\n" + "\n".join(parts)
      )

  # -- HF -> flax ---------------------------------------------------------------------------------

  def to_flax(self, ckpt: SafetensorsCheckpoint, *, target: Mapping[str, Any] | None = None, dtype=None) -> dict:
    """Reads `ckpt` into a nested param dict.

    target: optional {path: jax.ShapeDtypeStruct} (e.g. from `jax.eval_shape` of the model init, with
    `.sharding` set for sharded loading): checks paths/shapes, and gives each param's dtype and
    placement. Without it params keep the file dtype (or `dtype`) on the default device.
    """
    self.check_checkpoint(ckpt)
    if target is not None:
      self.check_target(target)
    flat: dict[str, jax.Array] = {}
    for rule in self.rules:
      for layer in rule.layers:
        keys = rule.keys_at(layer)
        outs = rule.to_flax(*(ckpt.read(k) for k in keys))
        for path, stacked, out, shape in zip(rule.paths_at(layer), rule.stacked_paths, outs, rule.param_shapes):
          if tuple(out.shape) != tuple(shape):
            raise CheckpointError(f"rule for {keys} produced {path} with shape {out.shape}, expected {shape}")
          spec = None if target is None else target[stacked if rule.scan else path]
          out = _materialize(out, dtype if spec is None else spec.dtype)
          sharding = None if spec is None else getattr(spec, "sharding", None)
          if not rule.scan:
            flat[path] = _put(out, sharding)
            continue
          sharding = sharding or _default_device_sharding()
          zeros, write = _stack_fns((rule.num_layers, *shape), out.dtype, sharding)
          if stacked not in flat:
            flat[stacked] = zeros()
          flat[stacked] = write(flat[stacked], _put(out, _layer_sharding(sharding)), layer)
        del outs
    return traverse_util.unflatten_dict(flat, sep="/")

  # -- flax -> HF ---------------------------------------------------------------------------------

  def to_hf(self, params: Mapping, *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF key, numpy array) one tensor at a time, unstacking scanned params per layer.

    Feed it to `safetensors_io.save_sharded`. `dtype` casts floating tensors (e.g. ml_dtypes.bfloat16).
    """
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    self.check_target({p: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for p, v in flat.items()})
    for rule in self.rules:
      for layer in rule.layers:
        if rule.scan:
          arrays = [np.asarray(flat[p][layer]) for p in rule.stacked_paths]
        else:
          arrays = [np.asarray(flat[p]) for p in rule.paths_at(layer)]
        outs = rule.to_hf(*arrays)
        for key, out, shape in zip(rule.keys_at(layer), outs, rule.hf_shapes):
          if tuple(out.shape) != tuple(shape):
            raise CheckpointError(f"rule for {key} produced shape {out.shape}, expected {shape}")
          yield key, _materialize(out, dtype)
