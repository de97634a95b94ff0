"""nvlm-jax: a JAX/Flax (linen) reimplementation of NVIDIA NVLM 1.0.

Top-level names are imported lazily so `import nvlm_jax` stays cheap.
"""
from __future__ import annotations

_LAZY = {
    "load_pretrained": "nvlm_jax.checkpoint.hf_import",
    "generate": "nvlm_jax.generation",
    "stream_generate": "nvlm_jax.generation",
    "Processor": "nvlm_jax.processing.processor",
    "load_processor": "nvlm_jax.training.processor_setup",
    "get_preset": "nvlm_jax.presets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
  if name in _LAZY:
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'nvlm_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
