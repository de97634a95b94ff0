"""Fusion of the vision pathway with the LLM: NVLM-D (decoder-only), NVLM-X (gated cross-attention) and
NVLM-H (hybrid). See docs/fusion.md. Classes are imported lazily (the modules pull in the model code)."""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

_LAZY = {
  "NVLMD": "nvlm_jax.fusion.nvlm_d",
  "NVLMX": "nvlm_jax.fusion.nvlm_x",
  "NVLMH": "nvlm_jax.fusion.nvlm_h",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
