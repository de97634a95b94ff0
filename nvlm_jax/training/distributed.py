"""Multi-process setup: `jax.distributed.initialize` from the config or the environment.

Call `initialize_from_config(config.distributed)` before anything touches JAX devices. Sources, first
found wins: the config (`coordinator_address`, `num_processes`, `process_id` >= 0), then the environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). coordinator_address "auto" lets JAX detect
a managed cluster (SLURM, Cloud TPU, ...). Without a coordinator nothing happens (one process).

`num_cpu_devices` > 0 gives each process that many CPU devices (multi-process tests on one machine).
Every process then reads its own share of the data (`jax.process_index()` / `jax.process_count()` go
to the data factory) and the trainer assembles global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def initialize_from_config(dist_config) -> None:
  get = dist_config.get if hasattr(dist_config, "get") else (lambda k, d=None: getattr(dist_config, k, d))
  cpu_devices = int(get("num_cpu_devices", 0) or 0)
  if cpu_devices > 0:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  address = get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not address:
    return
  if address == "auto":
    jax.distributed.initialize()
  else:
    num = int(get("num_processes", 0) or os.environ.get("JAX_NUM_PROCESSES", 0))
    pid = int(get("process_id", -1))
    if pid < 0:
      pid = int(os.environ.get("JAX_PROCESS_ID", -1))
    if num <= 0 or pid < 0:
      raise ValueError(
        f"distributed coordinator {address!r} given but num_processes={num}, process_id={pid}; "
        "set config.distributed.num_processes/process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID"
      )
    jax.distributed.initialize(address, num_processes=num, process_id=pid)
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
