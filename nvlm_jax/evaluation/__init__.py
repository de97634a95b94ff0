"""Benchmark scoring for NVLM evaluation (no model needed): data schema, converters, metrics, registry.

    from nvlm_jax.evaluation import BENCHMARKS, load_samples, score_file
    system, user = BENCHMARKS["vqav2"].build_prompt(sample)
    summary = score_file("vqav2", "preds.jsonl", "vqav2_val.jsonl")

See docs/evaluation.md.
"""

from nvlm_jax.evaluation.benchmarks import BENCHMARKS, Benchmark, benchmark_help, get_benchmark, images_for_prompt
from nvlm_jax.evaluation.predictions import PredictionsError, merge_predictions, read_predictions, write_predictions
from nvlm_jax.evaluation.schema import SchemaError, load_samples, validate_sample, write_samples
from nvlm_jax.evaluation.scoring import score_predictions
from nvlm_jax.lazy_exports import lazy_exports

# Lazy: `python -m nvlm_jax.evaluation.runner` must not find its module imported by the package first.
_, __getattr__, __dir__ = lazy_exports(__name__, {"score_file": "nvlm_jax.evaluation.runner"}, globals())

__all__ = [
  "BENCHMARKS",
  "Benchmark",
  "PredictionsError",
  "SchemaError",
  "benchmark_help",
  "get_benchmark",
  "images_for_prompt",
  "load_samples",
  "merge_predictions",
  "read_predictions",
  "score_file",
  "score_predictions",
  "validate_sample",
  "write_predictions",
  "write_samples",
]
