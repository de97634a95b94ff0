"""Plan a training run without the hardware: compile the real train step for a virtual mesh and report
per-device memory and FLOPs.

    python -m nvlm_jax.training.plan --config=configs/nvlm_d_72b_sft.py --mesh=fsdp=64,tensor=8
    python -m nvlm_jax.training.plan --config=configs/nvlm_d_72b_pretrain.py --mesh=fsdp=64,tensor=8 \\
        --config.data.num_microbatches=16

The mesh gets that many virtual CPU devices (`jax_num_cpu_devices`, set before JAX starts). The step is
lowered from ShapeDtypeStructs that carry their NamedShardings -- parameters, optimizer state and one
global batch -- so nothing is allocated, and XLA's SPMD partitioner compiles the per-device program the
accelerators would run. Reported:
  * memory_analysis(): per-device bytes of arguments (params + optimizer state + batch), outputs, the
    donated (aliased) part, temporaries; peak ~ arguments + temporaries + outputs - aliased.
  * cost_analysis(): FLOPs of the per-device program (remat recomputation included). XLA counts the body
    of a while loop once, and the step is loops (scan over layers, scan over microbatches), so the raw
    figure is far too low. With --flops=extrapolate (default) the planner also compiles the same step
    with 1 and 2 unrolled layers per tower (NVLM-X/H: 1 and 2 groups of `every` LLM layers + their
    cross-attention block) and one microbatch, and extrapolates linearly in the layer counts and the
    microbatches. Shown next to the analytic model FLOPs of flops.py (no recomputation).
The CPU compiler's memory numbers are a planning estimate, not the exact figure of a GPU/TPU build (other
fusion and layout decisions), but they scale the same way with mesh, batch, remat and microbatches.
--lower_only skips the compile (seconds instead of minutes) and reports the sharded state sizes only.
Also reported (both modes): which attention kernel each layer kind would use on --target_backend (the recipes
target H100s: gpu) under the config's attention_impl, and an estimate of the per-device attention memory the
fused kernel saves (the scores and probabilities it no longer materializes for the backward pass).
"""

from __future__ import annotations

import math
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=False)
_MESH = flags.DEFINE_string(
  "mesh",
  "",
  "Mesh axes, e.g. 'fsdp=64,tensor=8' (missing axes: 1). "
  "Default: the config's mesh with -1 resolved against --devices.",
)
_DEVICES = flags.DEFINE_integer("devices", 0, "Virtual devices (default: the product of --mesh).")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Lower only (no compile, no memory/FLOP analysis).")
_FLOPS = flags.DEFINE_enum(
  "flops",
  "extrapolate",
  ["extrapolate", "raw"],
  "extrapolate: correct XLA's loop-body-once FLOP count with 1-/2-layer unrolled compiles "
  "(2-3 extra small compiles); raw: report cost_analysis() as is.",
)

_TARGET = flags.DEFINE_enum(
  "target_backend", "gpu", ["gpu", "tpu", "cpu"], "Backend whose attention kernels the attention report assumes."
)

GIB = 1024**3


def attention_report(model_config, *, batch_per_device: int, seq_len: int, tensor: int, backend: str) -> list[dict]:
  """Per layer kind: the attention_impl choice on `backend` and the estimated per-device bytes it saves.

  Estimate: xla keeps each layer's fp32 scores and compute-dtype probabilities for the backward pass
  (B x H x Lq x Lk each; a causal blocked layer about half that), which a fused kernel never materializes;
  heads are split over `tensor`. Remat policies that drop these are not taken into account.
  """
  import jax.numpy as jnp  # lazy: main() sets up jax first

  from nvlm_jax.layers.attention_impl import choose_attention_impl  # lazy: imports jax (see main)

  llm = getattr(model_config, "llm", model_config)
  vision = getattr(model_config, "vision", None)
  xattn = getattr(model_config, "cross_attention", None)
  kinds = [
    (
      "llm self-attention",
      llm,
      "causal",
      seq_len,
      seq_len,
      llm.num_heads,
      llm.kv_head_dim,
      llm.num_layers,
      batch_per_device,
    )
  ]
  if vision is not None:
    tiles = batch_per_device * getattr(model_config, "max_tiles", 1)
    kinds.append(
      (
        "vit attention",
        vision,
        "full",
        vision.num_positions,
        vision.num_positions,
        vision.num_heads,
        vision.head_dim,
        vision.depth,
        tiles,
      )
    )
  if xattn is not None and getattr(model_config, "variant", "d") in ("x", "h") and xattn.every:
    heads, _, head_dim = xattn.heads(llm)
    image_len = getattr(model_config, "max_tiles", 1) * model_config.tokens_per_tile
    kinds.append(
      (
        "gated cross-attention",
        llm,
        "dense",
        seq_len,
        image_len,
        heads,
        head_dim,
        llm.num_layers // xattn.every,
        batch_per_device,
      )
    )
  rows = []
  for name, cfg, kind, q_len, k_len, heads, head_dim, layers, batch in kinds:
    impl = choose_attention_impl(
      cfg.attention_impl, backend, kind, q_len=q_len, k_len=k_len, head_dim=head_dim, dtype=cfg.dtype
    )
    per_entry = 4 + jnp.dtype(cfg.dtype).itemsize  # fp32 scores + probabilities in the compute dtype
    xla_bytes = batch * max(1, heads // tensor) * q_len * k_len * per_entry * layers
    if kind == "causal" and cfg.causal_block_size and q_len > cfg.causal_block_size:
      xla_bytes //= 2  # the blocked path skips (most of) the masked triangle
    saved = xla_bytes if impl in ("cudnn", "splash") else 0
    rows.append(
      dict(
        layer=name,
        mask=kind,
        impl=impl,
        setting=cfg.attention_impl,
        layers=layers,
        estimated_bytes_saved_per_device=saved,
        estimated_unfused_bytes_per_device=xla_bytes,
      )
    )
  return rows


def parse_mesh(text: str) -> dict[str, int]:
  from nvlm_jax import sharding  # imports jax, which this module loads only after the flags (see main)

  try:
    return sharding.parse_mesh(text)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def sharded_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard per leaf)."""
  import jax
  import numpy as np

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def _xla_flops(config, devices=None) -> float:
  """cost_analysis() FLOPs of the compiled step for `config` (per device)."""
  from nvlm_jax.training import trainer  # lazy: main() sets up jax first

  setup = trainer.build_setup(config, devices=devices)
  with trainer._MeshContext(setup):
    compiled = (
      trainer.jitted_train_step(setup).lower(setup.abstract_state, trainer.abstract_global_batch(setup)).compile()
    )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", math.nan))


def _shallow(config, llm_layers: int, vision_layers: int | None):
  """`config` with towers of the given depth, layers unrolled, one microbatch of the microbatch size."""
  import copy

  c = copy.deepcopy(config)
  c.unlock()
  overrides = c.model.overrides.to_dict() if hasattr(c.model.overrides, "to_dict") else dict(c.model.overrides)
  if vision_layers is None:  # a text-only CausalLM: the config is the decoder's
    overrides.update(num_layers=llm_layers, scan_layers=False)
  else:
    overrides["llm"] = {**overrides.get("llm", {}), "num_layers": llm_layers, "scan_layers": False}
    overrides["vision"] = {**overrides.get("vision", {}), "num_layers": vision_layers, "scan_layers": False}
  c.model.overrides = overrides
  micro = int(c.data.get("num_microbatches", 1))
  c.data.global_batch_size = c.data.global_batch_size // micro
  c.data.num_microbatches = 1
  return c


def extrapolated_flops(config, model_config, devices=None) -> float:
  """Per-device XLA FLOPs of the full step from unrolled shallow compiles (see module docstring).

  The LLM's repeating unit is one layer, or for NVLM-X/H one group of `every` layers with its gated
  cross-attention block; the ViT's is one layer.
  """
  llm = getattr(model_config, "llm", model_config)
  vision = getattr(model_config, "vision", None)
  xattn = getattr(model_config, "cross_attention", None)
  unit = xattn.every if (xattn is not None and getattr(model_config, "variant", "d") in ("x", "h")) else 1
  units = llm.num_layers // unit
  micro = int(config.data.get("num_microbatches", 1))
  v1 = None if vision is None else 1
  base = _xla_flops(_shallow(config, unit, v1), devices)
  per_llm_unit = _xla_flops(_shallow(config, 2 * unit, v1), devices) - base
  total = base + (units - 1) * per_llm_unit
  if vision is not None:
    per_vision_layer = _xla_flops(_shallow(config, unit, 2), devices) - base
    total += (vision.depth - 1) * per_vision_layer
  return micro * total


def plan(
  config,
  *,
  lower_only: bool = False,
  flops_mode: str = "extrapolate",
  out=None,
  devices=None,
  target_backend: str = "gpu",
) -> dict:
  """Lowers (and compiles) the train step for `config` on `devices` (default: all); returns the figures."""
  from nvlm_jax.training import optimizer, trainer  # lazy: main() sets up jax first

  say = lambda *a: print(*a, file=out or sys.stdout, flush=True)
  t0 = time.perf_counter()
  setup = trainer.build_setup(config, devices=devices)
  n_devices = setup.mesh.devices.size
  state = setup.abstract_state
  n_all = optimizer.count_params(state.params)
  n_train = optimizer.count_params(state.params, setup.labels)
  data = config.data
  say(
    f"model {config.model.preset or 'decoder'}: {n_all / 1e9:.2f}B params, {n_train / 1e9:.2f}B trainable; "
    f"mesh {dict(setup.mesh.shape)} = {n_devices} devices"
  )
  say(
    f"batch {data.global_batch_size} x {data.seq_len} tokens"
    + (f", {data.get('max_tiles', 0)} tile slots" if setup.multimodal else "")
    + f", {data.get('num_microbatches', 1)} microbatch(es); remat {dict(config.model.remat)}"
  )
  figures = {
    "devices": n_devices,
    "params": n_all,
    "trainable_params": n_train,
    "params_bytes_per_device": sharded_bytes(state.params),
    "opt_state_bytes_per_device": sharded_bytes(state.opt_state),
  }
  say(
    f"per device: params {figures['params_bytes_per_device'] / GIB:.2f} GiB, "
    f"optimizer state {figures['opt_state_bytes_per_device'] / GIB:.2f} GiB"
  )
  mesh = dict(setup.mesh.shape)
  shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
  micro_batch = max(1, data.global_batch_size // data.get("num_microbatches", 1) // shards)
  figures["attention"] = attention_report(
    setup.model_config,
    batch_per_device=micro_batch,
    seq_len=data.seq_len,
    tensor=mesh.get("tensor", 1),
    backend=target_backend,
  )
  for row in figures["attention"]:
    say(
      f"attention on {target_backend}: {row['layer']} ({row['mask']} mask, attention_impl={row['setting']}) -> "
      f"{row['impl']}; fused kernel saves ~{row['estimated_bytes_saved_per_device'] / GIB:.2f} GiB per device "
      f"(estimate: scores + probabilities of {row['layers']} layers not materialized)"
    )
  step = trainer.jitted_train_step(setup)
  with trainer._MeshContext(setup):
    lowered = step.lower(state, trainer.abstract_global_batch(setup))
  figures["lower_s"] = time.perf_counter() - t0
  say(f"lowered in {figures['lower_s']:.1f}s")
  model_flops = trainer.model_flops_per_step(setup)
  if model_flops is not None:
    figures["model_tflops_per_step"] = model_flops["total"] / 1e12
    say("analytic model TFLOPs per step: " + ", ".join(f"{k} {v / 1e12:,.1f}" for k, v in model_flops.items()))
  if lower_only:
    return figures
  t1 = time.perf_counter()
  compiled = lowered.compile()
  figures["compile_s"] = time.perf_counter() - t1
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  figures.update(
    argument_bytes=mem.argument_size_in_bytes,
    output_bytes=mem.output_size_in_bytes,
    alias_bytes=mem.alias_size_in_bytes,
    temp_bytes=mem.temp_size_in_bytes,
    peak_bytes=peak,
    xla_tflops_per_device=float(cost.get("flops", math.nan)) / 1e12,
  )
  say(f"compiled in {figures['compile_s']:.1f}s")
  say(
    f"per-device memory (XLA, CPU backend): arguments {mem.argument_size_in_bytes / GIB:.2f} GiB, "
    f"outputs {mem.output_size_in_bytes / GIB:.2f} GiB (donated/aliased {mem.alias_size_in_bytes / GIB:.2f}), "
    f"temporaries {mem.temp_size_in_bytes / GIB:.2f} GiB -> peak ~{peak / GIB:.2f} GiB"
  )
  say(
    f"per-device TFLOPs per step, XLA cost_analysis as reported: {figures['xla_tflops_per_device']:,.4g} "
    "(loop bodies counted once)"
  )
  if flops_mode == "extrapolate":
    t2 = time.perf_counter()
    figures["xla_tflops_per_device_extrapolated"] = extrapolated_flops(config, setup.model_config, devices) / 1e12
    say(
      f"per-device TFLOPs per step, XLA extrapolated over layers and microbatches (incl. remat recompute): "
      f"{figures['xla_tflops_per_device_extrapolated']:,.4g}  [{time.perf_counter() - t2:.0f}s]"
    )
  if model_flops is not None:
    say(f"per-device TFLOPs per step, analytic model FLOPs (flops.py): {model_flops['total'] / n_devices / 1e12:,.4g}")
  return figures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from nvlm_jax.training.config_base import missing_config_file  # lazy: main() sets up jax first

  if problem := missing_config_file(flags.FLAGS["config"]):
    raise app.UsageError(problem)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/nvlm_d_72b_sft.py")
  if _MESH.value:
    mesh = parse_mesh(_MESH.value)
    config.mesh.update(data=mesh.get("data", 1), fsdp=mesh.get("fsdp", 1), tensor=mesh.get("tensor", 1))
  sizes = [int(config.mesh.get(a, 1)) for a in ("data", "fsdp", "tensor")]
  devices = _DEVICES.value or (math.prod(sizes) if -1 not in sizes else 0)
  if devices <= 0:
    raise app.UsageError(f"mesh {sizes} has a -1 axis: pass --devices or a full --mesh")
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  plan(config, lower_only=_LOWER_ONLY.value, flops_mode=_FLOPS.value, target_backend=_TARGET.value)


if __name__ == "__main__":
  app.run(main)
