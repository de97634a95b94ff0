"""Per-token cross entropy (Megatron's `calculate_per_token_loss`).

The train step sums the cross entropy over loss tokens of every microbatch and divides by the number
of loss tokens in the whole GLOBAL batch, so a long answer weighs by its tokens, not by its sample,
and gradient accumulation gives exactly the loss of one big batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """-log softmax(logits)[target] per position, in fp32: logits [B, L, V], targets [B, L] -> [B, L]."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return log_z - target_logit


def masked_loss_sum(logits: jnp.ndarray, targets: jnp.ndarray, loss_mask: jnp.ndarray):
  """(sum of cross entropy over loss tokens, number of loss tokens), both fp32 scalars.

  Masked positions are removed with `where`, not multiplied away, so a garbage logit on a padding
  position cannot turn the sum into NaN; a NaN in a counted position still propagates (and the train
  step then skips the update).
  """
  mask = loss_mask.astype(jnp.float32)
  ce = token_cross_entropy(logits, targets)
  total = jnp.sum(jnp.where(mask != 0, ce * mask, 0.0))
  return total, jnp.sum(mask)
