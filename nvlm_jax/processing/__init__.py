"""Text side: tokenizer, chat template, tile tags and the Processor.

Submodules load on first use, so `nvlm_jax.processing.<module>` works after a plain `import nvlm_jax`."""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {}, globals())
