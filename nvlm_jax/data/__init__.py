"""Training data: record sources, blends, the map step, packing and the grain pipeline.

Submodules load on first use, so `nvlm_jax.data.<module>` works after a plain `import nvlm_jax`."""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {}, globals())
