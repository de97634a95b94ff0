"""Evaluate a checkpoint on a benchmark, or score an existing predictions file.

    # generate + score: a HF checkpoint dir or one of our training workdirs / checkpoints/<step> dirs
    python eval.py --checkpoint CKPT --benchmark vqav2 --data vqav2_val.jsonl --out results/vqav2 \\
        [--limit 500] [--batch-size 8] [--max-new-tokens 32] [--dtype bfloat16] [--mesh tensor=8]

    # score only (no model, no JAX): predictions JSONL + the samples they answer
    python eval.py --predictions results/vqav2/predictions.jsonl --benchmark vqav2 --data vqav2_val.jsonl

    # the held-out synthetic benchmark (no --data): every question of N unseen samples of the built-in
    # synthetic set, with the checkpoint's own data settings; prints accuracy per question type
    python eval.py --checkpoint WORKDIR --benchmark synthetic [--limit 500] [--batch-size 32] [--out DIR] \\
        [--synthetic-source '{"size": "tiny", "max_tiles": 6}']

--data is a samples JSONL in the evaluation schema (docs/evaluation.md; converters in
nvlm_jax.evaluation.converters). Prompts are the benchmark's (`Benchmark.build_prompt`: the paper's
per-task system prompt and answer suffix), decoding is greedy, answers are cut at EOS. --out receives
`predictions.jsonl` (one {"id", "prediction", ...} per sample) and `summary.json` (score, per-category
scores, and how the run was made). Samples without answers (unlabelled test splits) are generated but
not scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _parse_option(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"metric option {text!r} is not KEY=VALUE")
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def _parse_synthetic_source(text: str) -> dict[str, Any]:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f"--synthetic-source {text!r} is not JSON: {e}") from None
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError(f"--synthetic-source {text!r} must be a JSON object of SyntheticSource settings")
  return value


SYNTHETIC_HELP = (
  "  synthetic    exact match per question type (digits, tile, count, colour, word, text_only) on held-out\n"
  "               samples of the built-in synthetic set (seed 1,000,000); needs --checkpoint, no --data"
)


def _parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=2,tensor=4' -> {'fsdp': 2, 'tensor': 4} (axes data, fsdp, tensor; one may be -1)."""
  from nvlm_jax.sharding import parse_mesh  # imports jax: only when --mesh is given

  try:
    return parse_mesh(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
  from nvlm_jax.evaluation import benchmark_help

  parser = argparse.ArgumentParser(
    description=__doc__,
    epilog=benchmark_help() + "\n" + SYNTHETIC_HELP,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="HF checkpoint dir, or a training workdir / checkpoints/<step> dir")
  source.add_argument("--predictions", help="score this predictions JSONL instead of generating")
  parser.add_argument("--benchmark", required=True, help="benchmark name (listed below), e.g. vqav2")
  parser.add_argument("--data", help="samples JSONL (required with --checkpoint)")
  parser.add_argument("--out", help="output directory (default: eval_results/<benchmark>; scoring only: none)")
  parser.add_argument(
    "--limit", type=int, help="evaluate only the first N samples of --data (synthetic: N samples, default 500)"
  )
  parser.add_argument("--batch-size", type=int, help="default 8 (synthetic: 32 questions)")
  parser.add_argument("--max-new-tokens", type=int, help="default: the benchmark's (32 for short answers)")
  parser.add_argument(
    "--dtype", choices=("float32", "bfloat16", "float16"), help="compute/param dtype (default: as saved)"
  )
  parser.add_argument(
    "--tokenizer", help="directory with tokenizer.json, or a training workdir, if not beside the checkpoint"
  )
  parser.add_argument("--mesh", type=_parse_mesh, help="shard the model, e.g. 'tensor=8' or 'fsdp=2,tensor=4'")
  parser.add_argument(
    "--pad-to-multiple-of",
    type=int,
    help="left-pad prompts to a multiple of this: fewer distinct shapes, fewer compilations (default 128; "
    "synthetic: 32)",
  )
  parser.add_argument(
    "--synthetic-source",
    type=_parse_synthetic_source,
    help="synthetic only: SyntheticSource settings as JSON, e.g. '{\"size\": \"tiny\", \"max_tiles\": 6}' "
    "(default: those of the checkpoint's synthetic training source)",
  )
  parser.add_argument("--allow-missing", action="store_true", help="scoring only: score the predicted samples")
  parser.add_argument(
    "--option",
    action="append",
    default=[],
    type=_parse_option,
    help="metric option KEY=VALUE (listed below), e.g. scorer=megatron (repeatable)",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser


def _say(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _write_json(path: Path, data: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def score_only(args) -> dict:
  from nvlm_jax.evaluation import score_file

  summary = score_file(
    args.benchmark, args.predictions, args.data, allow_missing=args.allow_missing, **dict(args.option)
  )
  if args.out:
    _write_json(Path(args.out) / "summary.json", summary)
  return summary


def _is_unlabelled(benchmark, samples) -> bool:
  return "answers" in benchmark.required_fields and not any(s["answers"] for s in samples)


def _make_mesh(shape: dict[str, int], batch_size: int):
  """The (data, fsdp, tensor) mesh: over the first N devices unless an axis is -1 (then all of them)."""
  import math

  import jax

  from nvlm_jax import sharding

  devices = jax.devices()
  if -1 not in shape.values():
    needed = math.prod(shape.values())
    if needed > len(devices):
      raise SystemExit(f"eval.py: --mesh {shape} needs {needed} devices, found {len(devices)}")
    devices = devices[:needed]
  mesh = sharding.create_mesh(shape, devices)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % batch_ways:
    raise SystemExit(
      f"eval.py: --batch-size {batch_size} must be a multiple of the mesh's data x fsdp = "
      f"{batch_ways} (the batch is split over them)"
    )
  return mesh


def synthetic_benchmark(args) -> dict:
  """`--benchmark synthetic`: generated held-out questions, scored by exact match (nvlm_jax/evaluation/synthetic.py)."""
  from nvlm_jax.evaluation import synthetic

  unused = [f"--{name.replace('_', '-')}" for name in ("data", "mesh", "max_new_tokens") if getattr(args, name)]
  unused += ["--option"] if args.option else []
  if args.predictions or unused:
    given = ["--predictions"] if args.predictions else unused
    raise SystemExit(
      f"eval.py: --benchmark synthetic generates its own samples and answer length, and runs unsharded; "
      f"drop {' '.join(given)}"
    )
  limit = synthetic.DEFAULT_NUM_SAMPLES if args.limit is None else args.limit
  batch_size = 32 if args.batch_size is None else args.batch_size
  if limit < 1 or batch_size < 1:
    raise SystemExit(f"eval.py: --limit and --batch-size must be >= 1, got {limit} and {batch_size}")
  pad = synthetic.DEFAULT_PAD_TO_MULTIPLE_OF if args.pad_to_multiple_of is None else args.pad_to_multiple_of
  try:
    return synthetic.evaluate_checkpoint(
      args.checkpoint,
      num_samples=limit,
      batch_size=batch_size,
      source=args.synthetic_source,
      out=Path(args.out or os.path.join("eval_results", synthetic.NAME)),
      dtype=args.dtype,
      tokenizer=args.tokenizer,
      pad_to_multiple_of=pad,
      progress=not args.no_progress,
    )
  except synthetic.SyntheticBenchmarkError as e:
    raise SystemExit(f"eval.py: {e}") from None


def generate_and_score(args) -> dict:
  from nvlm_jax import models
  from nvlm_jax.evaluation import generate_answers as ga
  from nvlm_jax.evaluation import get_benchmark, load_samples, merge_predictions, score_predictions, write_predictions

  if not args.data:
    raise SystemExit("eval.py: --checkpoint needs --data (a samples JSONL)")
  if args.synthetic_source is not None:
    raise SystemExit("eval.py: --synthetic-source is for --benchmark synthetic only")
  args.batch_size = 8 if args.batch_size is None else args.batch_size
  args.pad_to_multiple_of = 128 if args.pad_to_multiple_of is None else args.pad_to_multiple_of
  if args.batch_size < 1:
    raise SystemExit(f"eval.py: --batch-size must be >= 1, got {args.batch_size}")
  benchmark = get_benchmark(args.benchmark)
  out = Path(args.out or os.path.join("eval_results", benchmark.name))
  samples = load_samples(args.data, check_images=True)
  if args.limit is not None:
    samples = samples[: max(args.limit, 0)]
  if not samples:
    raise SystemExit(f"eval.py: no samples to evaluate in {args.data}")

  mesh = _make_mesh(args.mesh, args.batch_size) if args.mesh else None
  t0 = time.perf_counter()
  model, params = models.load_model(args.checkpoint, dtype=args.dtype, mesh=mesh)
  processor = ga.load_processor(args.checkpoint, model, tokenizer=args.tokenizer)
  load_s = time.perf_counter() - t0
  _say(
    f"loaded {type(model).__name__} from {args.checkpoint} in {load_s:.1f}s; {len(samples)} {benchmark.name} samples"
  )

  max_new_tokens = args.max_new_tokens or benchmark.max_new_tokens
  t0 = time.perf_counter()
  with ga.mesh_context(mesh):
    rows = ga.generate_answers(
      model,
      params,
      processor,
      benchmark,
      samples,
      batch_size=args.batch_size,
      max_new_tokens=max_new_tokens,
      pad_to_multiple_of=args.pad_to_multiple_of,
      progress=not args.no_progress,
    )
  generate_s = time.perf_counter() - t0
  predictions_file = out / "predictions.jsonl"
  out.mkdir(parents=True, exist_ok=True)
  write_predictions(predictions_file, rows)

  if _is_unlabelled(benchmark, samples):
    summary: dict[str, Any] = {
      "benchmark": benchmark.name,
      "metric": benchmark.metric,
      "score": None,
      "num_samples": len(rows),
      "note": "the samples carry no answers (unlabelled split): predictions written, "
      "not scored; submit them to the benchmark's server",
    }
  else:
    summary = score_predictions(benchmark, merge_predictions(rows, samples), **dict(args.option))
  summary.update(
    {
      "checkpoint": os.fspath(args.checkpoint),
      "data_file": os.fspath(args.data),
      "predictions_file": os.fspath(predictions_file),
      "limit": args.limit,
      "batch_size": args.batch_size,
      "max_new_tokens": max_new_tokens,
      "decoding": "greedy",
      "dtype": args.dtype or "as saved",
      "num_unfinished": sum(not r["finished"] for r in rows),
      "load_seconds": round(load_s, 2),
      "generation_seconds": round(generate_s, 2),
      "samples_per_second": round(len(rows) / max(generate_s, 1e-9), 3),
    }
  )
  _write_json(out / "summary.json", summary)
  return summary


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.benchmark.lower() == "synthetic":
    from nvlm_jax.evaluation.synthetic import format_table

    summary = synthetic_benchmark(args)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    print(format_table(summary))
    return 0
  summary = score_only(args) if args.predictions else generate_and_score(args)
  print(json.dumps(summary, indent=2, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  sys.exit(main())
