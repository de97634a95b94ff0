"""The `python -m nvlm_jax.convert` commands: import, export, inspect, verify, stitch (cli.py parses them).

Submodules load on first use (`nvlm_jax.checkpoint.convert.<module>`)."""

from __future__ import annotations

from nvlm_jax.lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {}, globals())
