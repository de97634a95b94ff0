"""Score a predictions file: the whole of `eval.py --predictions FILE --benchmark NAME`.

python -m nvlm_jax.evaluation.runner --benchmark vqav2 --predictions preds.jsonl [--data data.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from nvlm_jax.evaluation.benchmarks import benchmark_help
from nvlm_jax.evaluation.predictions import merge_predictions, read_predictions
from nvlm_jax.evaluation.schema import load_samples
from nvlm_jax.evaluation.scoring import score_predictions


def score_file(
  benchmark: str,
  predictions_jsonl: str | os.PathLike,
  data_jsonl: str | os.PathLike | None = None,
  allow_missing: bool = False,
  per_sample: bool = False,
  **metric_options: Any,
) -> dict[str, Any]:
  """Read predictions (and, if given, the samples they answer) and return the summary dict.

  Without `data_jsonl` every prediction row must carry its sample's fields. With it, predictions are
  matched to samples by id; a sample without a prediction is an error unless allow_missing, in which
  case the summary's "num_missing" counts them and they are left out of the score.
  """
  predictions = read_predictions(predictions_jsonl)
  num_missing = 0
  if data_jsonl is not None:
    samples = load_samples(data_jsonl, resolve_images=False)
    predictions = merge_predictions(predictions, samples, allow_missing=allow_missing)
    num_missing = len(samples) - len(predictions)
  summary = score_predictions(benchmark, predictions, per_sample=per_sample, **metric_options)
  summary["predictions_file"] = os.fspath(predictions_jsonl)
  if data_jsonl is not None:
    summary["data_file"] = os.fspath(data_jsonl)
    summary["num_missing"] = num_missing
  return summary


def _parse_option(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"metric option {text!r} is not KEY=VALUE")
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, epilog=benchmark_help(), formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--benchmark", required=True, help="benchmark name (listed below)")
  parser.add_argument("--predictions", required=True, help="predictions JSONL ({'id', 'prediction'} per line)")
  parser.add_argument("--data", help="samples JSONL; needed unless predictions carry the sample fields")
  parser.add_argument("--allow-missing", action="store_true", help="score only the predicted samples")
  parser.add_argument(
    "--option",
    action="append",
    default=[],
    type=_parse_option,
    help="metric option KEY=VALUE (JSON value, listed below), e.g. scorer=megatron",
  )
  parser.add_argument("--output", help="also write the summary JSON here")
  args = parser.parse_args(argv)
  summary = score_file(
    args.benchmark, args.predictions, args.data, allow_missing=args.allow_missing, **dict(args.option)
  )
  text = json.dumps(summary, indent=2, ensure_ascii=False)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
