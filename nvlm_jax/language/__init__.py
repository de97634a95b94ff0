"""The decoder (Qwen2 / Llama style) with its KV cache.

Submodules load on first use, so `nvlm_jax.language.<module>` works after a plain `import nvlm_jax`."""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {}, globals())
