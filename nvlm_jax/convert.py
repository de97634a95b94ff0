"""`python -m nvlm_jax.convert`: the checkpoint converter's command line (nvlm_jax/checkpoint/convert/cli.py)."""

from __future__ import annotations

import sys

from nvlm_jax.checkpoint.convert.cli import main

if __name__ == "__main__":
  sys.exit(main())
