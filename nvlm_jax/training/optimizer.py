"""Which parameters train, and how: freezing by path pattern, AdamW, Megatron's LR schedule.

NVLM trains different modules per stage (docs/paper.md (g)): pretraining only the modality-alignment modules
(D: the projector; X: the gated cross-attention layers; H: both), SFT also the LLM; the vision encoder
is always frozen. A config lists the trainable modules as path patterns; every other parameter is
frozen: `optax.multi_transform` gives it `optax.set_to_zero()` (hence no Adam moments) and the train
step never differentiates with respect to it.

Patterns are shell globs (`fnmatch`, where `*` also crosses `/`) over the '/'-joined parameter path,
e.g. "projector/mlp/fc1/kernel". A pattern selects a path when it matches the path itself or any
ancestor: "projector" selects the whole projector, "language_model/*cross_attn*" every cross-attention
block inside the decoder, "*" everything. A pattern that selects nothing is an error (a typo would
otherwise silently freeze a module).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

TRAINABLE, FROZEN = "trainable", "frozen"


def path_str(path) -> str:
  """A jax key path -> 'a/b/c' (the names flax uses in its params dict)."""
  parts = []
  for k in path:
    name = getattr(k, "key", None)
    if name is None:
      name = getattr(k, "name", None)
    if name is None:
      name = getattr(k, "idx", k)
    parts.append(str(name))
  return "/".join(parts)


def pattern_selects(pattern: str, path: str) -> bool:
  parts = path.split("/")
  return any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def trainable_labels(params: Any, patterns: Sequence[str]) -> Any:
  """A tree like `params` whose leaves are "trainable" or "frozen"; raises for a pattern that selects nothing."""
  if isinstance(patterns, str):
    patterns = (patterns,)
  patterns = tuple(patterns)
  paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  unused = [pat for pat in patterns if not any(pattern_selects(pat, p) for p in paths)]
  if unused:
    top = sorted({p.split("/")[0] for p in paths})
    raise ValueError(
      f"trainable pattern(s) {unused} select no parameter; top-level modules are {top} (e.g. {paths[:3]})"
    )
  return jax.tree_util.tree_map_with_path(
    lambda p, _: TRAINABLE if any(pattern_selects(pat, path_str(p)) for pat in patterns) else FROZEN, params
  )


def split_trainable(params: Any, labels: Any) -> tuple[Any, Any]:
  """(trainable, frozen): two trees shaped like `params`, each with None where the other holds the leaf.

  `jax.grad` over the trainable tree never builds gradients of frozen weights.
  """
  trainable = jax.tree.map(lambda p, l: p if l == TRAINABLE else None, params, labels)
  frozen = jax.tree.map(lambda p, l: p if l == FROZEN else None, params, labels)
  return trainable, frozen


def merge_trainable(trainable: Any, frozen: Any) -> Any:
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def count_params(params: Any, labels: Any | None = None, label: str = TRAINABLE) -> int:
  leaves = (
    jax.tree.leaves(params)
    if labels is None
    else [p for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == label]
  )
  return int(sum(x.size for x in leaves))


NO_DECAY_NAMES = ("bias", "scale")


def weight_decay_mask(logical_specs: Any) -> Any:
  """True for weight matrices: >= 2 axes besides a scan 'layers' axis, and not a bias or norm scale.

  Megatron decays no bias and no norm weight; our q/k norm scales are [heads, head_dim], hence the name test.
  """

  def decays(path, spec):
    axes = [a for a in spec if a != "layers"]
    return len(axes) >= 2 and path_str(path).split("/")[-1] not in NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, logical_specs, is_leaf=lambda x: isinstance(x, P))


def lr_schedule(max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> optax.Schedule:
  """Megatron's schedule: linear warmup 0 -> max_lr, cosine max_lr -> min_lr until `decay_steps`, then min_lr.

  `decay_steps` counts from step 0 (Megatron's --lr-decay-iters), so the cosine spans
  decay_steps - warmup_steps updates. The first update uses max_lr / warmup_steps (Megatron's uses 0).
  A run shorter than its warmup is refused by the settings check (settings_problems). optax's
  warmup_cosine_decay_schedule, with the warmup evaluated one step ahead.
  """
  warmup = max(int(warmup_steps), 0)
  cosine_end = warmup + max(int(decay_steps) - warmup, 1)  # optax counts the cosine from the end of warmup
  optax_schedule = optax.warmup_cosine_decay_schedule(0.0, max_lr, warmup, cosine_end, end_value=min_lr)

  def schedule(step):
    return optax_schedule(jnp.where(step < warmup, step + 1, step))  # warmup one step ahead: no zero-lr update

  return schedule


def _number(value) -> float | None:
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def settings_problems(opt_config, total_steps) -> list[str]:
  """What is wrong with the optimizer settings (empty if nothing), one line per setting, checked before
  anything is compiled: a mistyped lr must not train (lr=-1 runs gradient ascent, lr=nan saves NaNs)."""
  problems = []

  def bad(name, why):
    problems.append(f"config.optimizer.{name}={opt_config.get(name)!r}: {why}")

  lr, min_lr = _number(opt_config.get("lr")), _number(opt_config.get("min_lr", 0.0))
  if lr is None or not math.isfinite(lr) or lr <= 0:
    bad("lr", "must be a finite number > 0")
  if min_lr is None or not math.isfinite(min_lr) or min_lr < 0:
    bad("min_lr", "must be a finite number >= 0")
  elif lr is not None and math.isfinite(lr) and min_lr > lr:
    bad("min_lr", f"must be <= lr ({lr})")
  warmup = opt_config.get("warmup_steps", 0)
  if not isinstance(warmup, int) or warmup < 0:
    bad("warmup_steps", "must be an integer >= 0")
  elif isinstance(total_steps, int) and warmup > total_steps:
    bad("warmup_steps", f"must be <= total_steps ({total_steps}); lower it for a short run")
  decay = opt_config.get("decay_steps", 0)
  if not isinstance(decay, int) or decay < 0:
    bad("decay_steps", "must be an integer >= 0 (0 = total_steps)")
  elif decay and isinstance(warmup, int) and decay < warmup:
    bad("decay_steps", f"must be 0 or >= warmup_steps ({warmup})")
  for name in ("b1", "b2"):
    value = _number(opt_config.get(name))
    if value is None or not 0 <= value < 1:
      bad(name, "must be in [0, 1)")
  eps = _number(opt_config.get("eps", 1e-8))
  if eps is None or not math.isfinite(eps) or eps <= 0:
    bad("eps", "must be a finite number > 0")
  decay_rate = _number(opt_config.get("weight_decay", 0.0))
  if decay_rate is None or not math.isfinite(decay_rate) or decay_rate < 0:
    bad("weight_decay", "must be a finite number >= 0")
  clip = _number(opt_config.get("grad_clip", 0.0))
  if clip is None or not math.isfinite(clip) or clip < 0:
    bad("grad_clip", "must be a finite number > 0 (the global-norm bound), or 0 for no clipping")
  return problems


def make_optimizer(opt_config, labels: Any, decay_mask: Any, total_steps: int):
  """AdamW with global-norm clipping for the trainable group, set_to_zero for the frozen one.

  opt_config fields: lr, min_lr, warmup_steps, decay_steps (0 = total_steps), b1, b2, eps,
  weight_decay, grad_clip (0 = off). Returns (GradientTransformation, schedule).
  """
  decay_steps = int(opt_config.get("decay_steps", 0) or total_steps)
  schedule = lr_schedule(opt_config.lr, opt_config.min_lr, opt_config.warmup_steps, decay_steps)
  parts = []
  if opt_config.get("grad_clip", 0):
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip))
  parts.append(
    optax.adamw(
      schedule,
      b1=opt_config.b1,
      b2=opt_config.b2,
      eps=opt_config.get("eps", 1e-8),
      weight_decay=opt_config.weight_decay,
      mask=decay_mask,
    )
  )
  tx = optax.multi_transform({TRAINABLE: optax.chain(*parts), FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule


def abstract_opt_state_with_names(tx, boxed_abstract_params: Any) -> Any:
  """eval_shape of tx.init on *boxed* params: Adam moments inherit the parameters' logical axis names,
  so `nn.get_partition_spec` gives the optimizer state the same sharding as the weights it tracks."""
  return jax.eval_shape(tx.init, boxed_abstract_params)


def opt_state_logical_specs(tx, boxed_abstract_params: Any) -> Any:
  return nn.get_partition_spec(abstract_opt_state_with_names(tx, boxed_abstract_params))
