"""Lazy package attributes: `import nvlm_jax` (or a subpackage) stays cheap, and a name is imported from
its module the first time it is used (PEP 562 module `__getattr__`)."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, names: dict[str, str], namespace: dict) -> tuple[list[str], Callable, Callable]:
  """Returns (__all__, __getattr__, __dir__) for a package exporting `names` ({name: module})."""

  def __getattr__(name: str):
    if name in names:
      value = getattr(importlib.import_module(names[name]), name)
      namespace[name] = value  # later lookups skip __getattr__
      return value
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__():
    return sorted(set(namespace) | set(names))

  return sorted(names), __getattr__, __dir__
