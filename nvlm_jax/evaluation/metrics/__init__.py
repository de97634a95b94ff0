"""Benchmark metrics, one module per family; each follows an official script named in its docstring."""
