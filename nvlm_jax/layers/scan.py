"""Layer stacks under nn.scan: one compiled layer body, parameters stacked on a leading "layers" axis."""

from __future__ import annotations

import flax.linen as nn


def scan_layers(layer_cls, length: int, *, num_broadcast: int, num_scanned: int):
  """nn.scan over `length` copies of layer_cls(carry, *broadcast_args, *scanned_args) -> (carry, ys).

  Parameters get a leading axis named "layers"; scanned args (e.g. the per-layer KV cache) are sliced
  along their leading axis and the per-layer outputs stacked back.
  """
  return nn.scan(
    layer_cls,
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=(nn.broadcast,) * num_broadcast + (0,) * num_scanned,
    length=length,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
