"""Shared building blocks: linear projections, norms, attention, MLPs, RoPE.

Submodules load on first use, so `nvlm_jax.layers.<module>` works after a plain `import nvlm_jax`."""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {}, globals())
