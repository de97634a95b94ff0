"""Named rematerialization policies (what to keep from the forward pass for the backward pass)."""

from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = {
  "none": None,  # no remat: keep everything
  "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
  "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def get_policy(name: str):
  """Returns (use_remat, policy) for a config name; unknown names are an error listing the choices."""
  if name not in POLICIES:
    raise ValueError(f"unknown remat_policy {name!r}; choose one of {sorted(POLICIES)}")
  return name != "none", POLICIES[name]


def maybe_remat(layer_cls, policy_name: str, scanned: bool):
  """layer_cls under nn.remat with the named policy (CSE is prevented only outside nn.scan); as is for "none"."""
  use_remat, policy = get_policy(policy_name)
  if not use_remat:
    return layer_cls
  return nn.remat(layer_cls, policy=policy, prevent_cse=not scanned)
