"""Test setup: 8 virtual CPU devices (sharding tests) and exact fp32 matmuls (parity tests).

The platform and the device count are forced, not defaulted: an inherited XLA_FLAGS, JAX_PLATFORMS or a GPU
on the host must not shrink the suite (tests that need 8 devices would otherwise skip or fail quietly).
If JAX cannot be given 8 CPU devices, the session stops here with the reason, once.
This must run before jax is imported anywhere, which is why it lives in conftest.
"""

import os
import re

import pytest

DEVICES = 8
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _with_device_count(flags: str, count: int) -> str:
  """XLA_FLAGS with exactly one device-count flag, set to `count` (other flags kept)."""
  kept = re.sub(rf"{_COUNT_FLAG}=\S*", "", flags).split()
  return " ".join(kept + [f"{_COUNT_FLAG}={count}"])


os.environ["XLA_FLAGS"] = _with_device_count(os.environ.get("XLA_FLAGS", ""), DEVICES)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

try:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", DEVICES)
  _devices = jax.devices()
except Exception as e:
  raise pytest.UsageError(f"tests/conftest.py could not give JAX {DEVICES} CPU devices: {e!r}") from e
if len(_devices) != DEVICES or {d.platform for d in _devices} != {"cpu"}:
  raise pytest.UsageError(
    f"tests/conftest.py needs {DEVICES} CPU devices but JAX has {_devices}: jax was initialized before conftest "
    f"ran (a plugin or sitecustomize importing jax?); XLA_FLAGS={os.environ['XLA_FLAGS']!r}"
  )

jax.config.update("jax_default_matmul_precision", "highest")
