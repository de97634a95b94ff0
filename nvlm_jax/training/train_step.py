"""The jitted train step: microbatched gradients, per-token loss, AdamW update, NaN/Inf skipping.

One step consumes one GLOBAL batch [B, ...]. It is split into `num_microbatches` microbatches that a
`lax.scan` runs one after the other, adding up gradients of (cross-entropy sum / loss tokens in the
whole global batch), so accumulation reproduces the big-batch gradient exactly (up to summation order).
Microbatch m takes rows m, m + M, m + 2M, ...: with rows sharded contiguously over the batch devices,
every device keeps working on its own rows and no data moves.

Only trainable parameters are differentiated (optimizer.split_trainable). If the loss or the gradient
norm is not finite, or the update would make a parameter or an optimizer moment non-finite, the update is
dropped inside the step (parameters and optimizer state stay as they were), `skipped_steps` and
`nonfinite_streak` count it, and the host loop aborts after too many in a row. So a non-finite value never
enters the state (and never a checkpoint).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nvlm_jax.training import batch as batch_lib
from nvlm_jax.training.loss import masked_loss_sum
from nvlm_jax.training.optimizer import merge_trainable, split_trainable

BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue bit-exactly (plus the data iterator, saved beside it).

  step:             global steps taken (batches consumed), skipped ones included
  applied_steps:    optimizer updates actually applied (drives the LR schedule, like optax's count)
  skipped_steps:    total updates dropped for a non-finite loss / gradient
  nonfinite_streak: consecutive dropped updates (reset by a good step)
  rng:              raw uint32 PRNG key data (stochastic layers, if any); split every step
  """

  step: jnp.ndarray
  applied_steps: jnp.ndarray
  skipped_steps: jnp.ndarray
  nonfinite_streak: jnp.ndarray
  rng: jnp.ndarray
  params: Any
  opt_state: Any


def new_train_state(params, opt_state, rng: jax.Array) -> TrainState:
  """The step-0 state around `params`: counters at zero, `rng` (a typed PRNG key) as the state's key."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
    step=zero,
    applied_steps=zero,
    skipped_steps=zero,
    nonfinite_streak=zero,
    rng=jax.random.key_data(rng),
    params=params,
    opt_state=opt_state,
  )


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def split_microbatches(batch: dict[str, jnp.ndarray], num_microbatches: int, mesh=None) -> dict[str, jnp.ndarray]:
  """[B, ...] -> [M, B/M, ...] with microbatch m = rows m::M (stays local to each batch shard)."""

  def split(x):
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(f"global batch {b} is not divisible by num_microbatches={num_microbatches}")
    y = x.reshape(b // num_microbatches, num_microbatches, *x.shape[1:])
    y = jnp.moveaxis(y, 1, 0)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (x.ndim - 1)))))
    return y

  return {k: split(v) for k, v in batch.items()}


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  labels: Any,
  schedule: Callable,
  *,
  num_microbatches: int = 1,
  mesh=None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns step(state, batch) -> (state, metrics); jit it with `jit_train_step`."""

  def loss_fn(trainable, frozen, micro, denominator):
    params = merge_trainable(trainable, frozen)
    input_ids, kwargs = batch_lib.model_inputs(micro)
    logits = model.apply({"params": params}, input_ids, **kwargs)
    total, count = masked_loss_sum(logits, micro["targets"], micro["loss_mask"])
    return total / denominator, (total, count)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict[str, jnp.ndarray]):
    trainable, frozen = split_trainable(state.params, labels)
    # Megatron's per-token loss: normalize by the loss tokens of the GLOBAL batch (at least 1).
    denominator = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    if num_microbatches == 1:
      (_, (loss_sum, token_count)), grads = grad_fn(trainable, frozen, batch, denominator)
    else:
      micro = split_microbatches(batch, num_microbatches, mesh)

      def body(carry, mb):
        grads_acc, loss_acc, count_acc = carry
        (_, (total, count)), grads = grad_fn(trainable, frozen, mb, denominator)
        return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + total, count_acc + count), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
      (grads, loss_sum, token_count), _ = jax.lax.scan(body, init, micro)

    loss = loss_sum / denominator
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # multi_transform wants a gradient for every leaf; the frozen group's set_to_zero ignores these
    # zeros, so XLA removes them and the frozen weights are never touched below.
    full_grads = merge_trainable(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, new_opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_trainable = optax.apply_updates(trainable, split_trainable(updates, labels)[0])

    # An overflowing update (a huge lr) is refused like a non-finite gradient.
    finite = finite & all_finite(new_trainable) & all_finite(new_opt_state)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = merge_trainable(keep(new_trainable, trainable), frozen)
    new_opt_state = keep(new_opt_state, state.opt_state)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    finite_i = finite.astype(jnp.int32)
    new_state = state.replace(
      step=state.step + 1,
      applied_steps=state.applied_steps + finite_i,
      skipped_steps=state.skipped_steps + (1 - finite_i),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      rng=rng,
      params=new_params,
      opt_state=new_opt_state,
    )
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": schedule(state.applied_steps),
      "loss_tokens": token_count,
      # packed samples in the batch: the largest segment id of each row
      "samples": jnp.sum(jnp.max(batch["segment_ids"], axis=1)),
      "skipped": 1 - finite_i,
      "skipped_steps": new_state.skipped_steps,
      "nonfinite_streak": new_state.nonfinite_streak,
    }
    return new_state, metrics

  return step


def all_finite(tree) -> jnp.ndarray:
  """True iff every floating-point element of `tree` is finite (a scalar bool; True for no float leaves)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def jit_train_step(step_fn, state_shardings, batch_shardings, mesh, compiler_options=None):
  """jax.jit with explicit in/out shardings and the state donated (updated in place)."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
    compiler_options=compiler_options,
  )
