"""Test setup: 8 virtual CPU devices (sharding tests) and exact fp32 matmuls (parity tests).

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives in conftest.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
