"""Per-layer views of a scanned decoder's stacked weights, so that decoding reads every weight in place.

A scanned decoder (`scan_layers=True`, the default) keeps each weight of all its layers in one array with a
leading layers axis. Under jit, XLA:CPU reads one layer out of such a stack by copying it (a dynamic slice in
the layer scan; static slices copy too), and its matmuls then read the copy. A decode step is bound by reading
the weights once, so copying them at every step about doubles it (bench/README.md). Separately held per-layer
arrays, as the unrolled module (`scan_layers=False`) takes them, are read in place.

On CPU a jax array's buffer is host memory: `np.asarray` exposes it without a copy, numpy slices it without a
copy, and `jax.device_put` of an aligned numpy view wraps that memory without a copy. `decoding_layout` turns
each stacked decoder weight into per-layer arrays made this way: they alias the caller's stacked buffers (no
weight memory is added, the caller's params stay valid and unchanged) and keep those buffers alive. Every alias
is checked by address. A slice whose address jax cannot wrap (not 64-byte aligned: gate scalars, short biases)
is copied when it is small (SMALL_COPY_BYTES). Where a large one cannot be wrapped, or the stacks are not on one
CPU device (an accelerator, params sharded over several devices), nothing is converted and decoding keeps the
scanned module, as before.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import numpy as np

log = logging.getLogger(__name__)
SMALL_COPY_BYTES = 64 * 1024  # per layer slice: what may be copied when its memory cannot be wrapped
_reported: set[str] = set()


class _NotAliasable(Exception):
  """A stacked weight whose layers cannot be wrapped in place (the reason is the message)."""


def _language_config(model_config):
  return getattr(model_config, "llm", model_config)


def unrolled_module(model: nn.Module) -> nn.Module:
  """The same model with its language model's layers unrolled (`layers_{i}` params, one array per layer)."""
  config = model.config
  if hasattr(config, "llm"):
    return model.clone(config=config.replace(llm=config.llm.replace(scan_layers=False)))
  return model.clone(config=config.replace(scan_layers=False))


def _device(stacks: Any):
  """The one CPU device holding every stacked weight (what makes them viewable from numpy)."""
  devices = set()
  for stacked in jax.tree.leaves(stacks):
    if not isinstance(stacked, jax.Array):
      raise _NotAliasable(f"a {type(stacked).__name__} leaf, not a jax array")
    devices |= stacked.devices()
  if len(devices) != 1:
    raise _NotAliasable(f"an array on {len(devices)} devices")
  device = devices.pop()
  if device.platform != "cpu":
    raise _NotAliasable(f"an array on {device.platform}, whose memory numpy cannot see")
  return device


def _host_view(stacked: jax.Array) -> np.ndarray:
  """The numpy array over a CPU jax array's own buffer (no copy)."""
  host = np.asarray(stacked)
  if host.ctypes.data != stacked.unsafe_buffer_pointer():
    raise _NotAliasable("np.asarray copied the array")
  return host


def _wrap_all(host_tree: Any, device) -> Any:
  """jax arrays over the memory of a tree of numpy views, in one transfer call (per-array calls cost ~10x more).

  jax wraps only 64-byte aligned memory; a slice that is not (a gate scalar, a short bias) is copied if it is at
  most SMALL_COPY_BYTES, else refused rather than doubled."""
  views, treedef = jax.tree.flatten(host_tree)
  arrays = jax.device_put(views, jax.sharding.SingleDeviceSharding(device))
  for view, array in zip(views, arrays):
    if array.unsafe_buffer_pointer() != view.ctypes.data and view.nbytes > SMALL_COPY_BYTES:
      raise _NotAliasable(f"jax copied a {view.shape} {view.dtype} layer slice (address {view.ctypes.data} % 64 != 0)")
  return jax.tree.unflatten(treedef, arrays)


def _unstacked_decoder(decoder: dict, model_config) -> dict:
  """A scanned decoder's params in the unrolled module's layout (`layers_{i}`, `cross_attn_{g}`), as views."""
  llm = _language_config(model_config)
  stacks = {k: decoder[k] for k in ("layers", "groups") if k in decoder}
  device = _device(stacks)
  hosts = jax.tree.map(_host_view, stacks)

  def at(tree, index):  # `...` keeps a 0-d slice an array (a view), not a numpy scalar
    return jax.tree.map(lambda host: host[index + (Ellipsis,)], tree)

  views = {}
  if "layers" in hosts:  # DecoderStack: layers [L, ...]
    for i in range(llm.num_layers):
      views[f"layers_{i}"] = at(hosts["layers"], (i,))
  else:  # CrossAttentionDecoderStack (NVLM-X/H): groups/{layers_before, layers_after} [G, n, ...], cross_attn [G, ...]
    xattn = model_config.cross_attention
    for i in range(llm.num_layers):
      stack, group, j = xattn.layer_slot(i)
      views[f"layers_{i}"] = at(hosts["groups"][stack], (group, j))
    for g in range(xattn.num_blocks(llm.num_layers)):
      views[f"cross_attn_{g}"] = at(hosts["groups"]["cross_attn"], (g,))
  rest = {k: v for k, v in decoder.items() if k not in stacks}
  return {**rest, **_wrap_all(views, device)}


def decoding_layout(model: nn.Module, params: Any) -> tuple[nn.Module, Any]:
  """(model, params) for the decode loop: the unrolled module and per-layer views of a scanned model's weights.

  Returns the arguments unchanged when the layers are not scanned, or when the views cannot be made without
  copying (said once per reason at WARNING): the decode loop then slices the stacks, as the scanned module does.
  The views share memory with `params`; nothing in `params` is modified.
  """
  if not _language_config(model.config).scan_layers:
    return model, params
  holder = "language_model" if "language_model" in params else None
  language = params[holder] if holder else params
  try:
    decoder = _unstacked_decoder(language["decoder"], model.config)
  except _NotAliasable as why:
    reason = str(why)
    if reason not in _reported:
      _reported.add(reason)
      log.warning(
        "decoding with scanned layers (per-step weight slices): cannot view the stacked weights in place: %s", reason
      )
    return model, params
  language = {**language, "decoder": decoder}
  return unrolled_module(model), ({**params, holder: language} if holder else language)
