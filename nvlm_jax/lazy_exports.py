"""Lazy package attributes: `import nvlm_jax` (or a subpackage) stays cheap, and a name is imported from
its module the first time it is used (PEP 562 module `__getattr__`); subpackages too, so a dotted name such as
`nvlm_jax.fusion.NVLMD` works after a plain `import nvlm_jax`."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable


def lazy_exports(package: str, names: dict[str, str], namespace: dict) -> tuple[list[str], Callable, Callable]:
  """Returns (__all__, __getattr__, __dir__) for a package exporting `names` ({name: module})."""

  def __getattr__(name: str):
    if name in names:
      value = getattr(importlib.import_module(names[name]), name)
      namespace[name] = value  # later lookups skip __getattr__
      return value
    if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
      return importlib.import_module(f"{package}.{name}")  # `nvlm_jax.fusion.NVLMD` without importing fusion
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__():
    return sorted(set(namespace) | set(names))

  return sorted(names), __getattr__, __dir__
