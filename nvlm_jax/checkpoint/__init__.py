"""Weights in and out: safetensors and orbax I/O, HF <-> flax name maps, the convert commands.

Submodules load on first use, so `nvlm_jax.checkpoint.<module>` works after a plain `import nvlm_jax`."""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {}, globals())
