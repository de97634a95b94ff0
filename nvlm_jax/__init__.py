"""nvlm-jax: a JAX/Flax (linen) reimplementation of NVIDIA NVLM 1.0.

Top-level names are imported lazily so `import nvlm_jax` stays cheap.
"""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

_LAZY = {
  "load_pretrained": "nvlm_jax.models",
  "generate": "nvlm_jax.generation",
  "stream_generate": "nvlm_jax.generation",
  "Processor": "nvlm_jax.processing.processor",
  "load_processor": "nvlm_jax.evaluation.generate_answers",
  "get_preset": "nvlm_jax.presets",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
