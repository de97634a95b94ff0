"""The package's import structure: imports flow one way, and few of them hide inside functions.

Order (a module may import its own unit and the units before it, at module level and inside functions alike):
  config, sharding, presets -> layers -> language, vision, processing -> fusion -> checkpoint (formats)
  -> models -> layer_views -> generation -> data -> training -> evaluation -> studies -> the command lines
  (chat, convert: with checkpoint/convert/, the converter's commands)
A function-level import of our own modules is allowed where it keeps a heavy or optional dependency out of a
light path, or runs a command's code only when that command is chosen; it says why in a comment on its line or the line above.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nvlm_jax"
ORDER = (
  "lazy_exports",
  "config",
  "sharding",
  "presets",
  "layers",
  "language",
  "vision",
  "processing",
  "fusion",
  "checkpoint",
  "models",
  "layer_views",
  "generation",
  "data",
  "training",
  "evaluation",
  "studies",
  "chat",
  "convert",
  "nvlm_jax",
)
RANK = {unit: i for i, unit in enumerate(ORDER)}
FUNCTION_LEVEL_BUDGET = 0.15


def unit_of(module: str) -> str:
  """The unit of a module: its sub-package (or top-level module) under nvlm_jax; the converter's commands
  (nvlm_jax/checkpoint/convert/) belong to the `convert` command line, above everything they call."""
  parts = module.split(".")
  if parts[1:3] == ["checkpoint", "convert"]:
    return "convert"
  return parts[1] if len(parts) > 1 else "nvlm_jax"


def own_imports():
  """(file, line, importing unit, imported unit, inside a function, source line + a comment line above it)."""
  rows = []
  for file in sorted(PACKAGE.rglob("*.py")):
    module = ".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    text = file.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    in_function = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nvlm_jax"):
        targets = [f"{node.module}.{a.name}" if node.module == "nvlm_jax" else node.module for a in node.names]
      elif isinstance(node, ast.Import):
        targets = [a.name for a in node.names if a.name.startswith("nvlm_jax")]
      else:
        continue
      said = (
        lines[node.lineno - 1] + " " + (lines[node.lineno - 2] if lines[node.lineno - 2].strip()[:1] == "#" else "")
      )
      for target in dict.fromkeys(unit_of(t) for t in targets):
        rows.append(
          (file.relative_to(PACKAGE.parent), node.lineno, unit_of(module), target, id(node) in in_function, said)
        )
  return rows


def test_every_unit_has_a_place_in_the_order():
  modules = (".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts) for f in PACKAGE.rglob("*.py"))
  units = {unit_of(m.removesuffix(".__init__")) for m in modules}
  assert units <= set(ORDER), f"place these in ORDER (tests/test_structure.py): {sorted(units - set(ORDER))}"


def test_imports_flow_one_way():
  """No cycle between units: every import, at module level or inside a function, points to the same unit or an
  earlier one (a function-level import may defer loading, never invert the order)."""
  upward = [f"{f}:{line} ({a} -> {b})" for f, line, a, b, _, _ in own_imports() if RANK[b] > RANK[a]]
  assert not upward, "imports against the order:\n  " + "\n  ".join(upward)


def test_function_level_imports_are_few_and_say_why():
  rows = own_imports()
  nested = [r for r in rows if r[4]]
  assert len(nested) <= FUNCTION_LEVEL_BUDGET * len(rows), f"{len(nested)} of {len(rows)} imports inside functions"
  silent = [f"{f}:{line}" for f, line, *_, source in nested if "#" not in source]
  assert not silent, "function-level imports without a reason comment:\n  " + "\n  ".join(silent)
