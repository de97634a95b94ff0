"""Throughput of the training input pipeline (nvlm_jax/data/pipeline.py), printed as JSON.

    python bench/data_pipeline.py [--seconds 20] [--settings tiny,paper] [--workers 0,2]

Settings (synthetic data, the tiny demo tokenizer, batch 8 rows):
  tiny:  56 px tiles (patch 7 -> 16 tokens per tile), 6 + 1 tiles, seq_len 256, synthetic "tiny" (56-224 px images)
  paper: 448 px tiles (patch 14 -> 256 tokens per tile), 6 + 1 tiles, seq_len 3200 (NVLM-D SFT),
         synthetic "paper" (448-1344 px images, drawn and PNG-encoded on the fly)
For each setting: the map step alone in one thread (`map_only`, samples/s of EncodeRecord over source
records, drawing included), then the whole pipeline with 0 and 2 worker processes. `startup_s` is the time
to the first batch (worker processes spawn and import jax); `samples_per_s` is measured after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {
  "tiny": {"image_size": 56, "patch_size": 7, "seq_len": 256, "size": "tiny"},
  "paper": {"image_size": 448, "patch_size": 14, "seq_len": 3200, "size": "paper"},
}


def make_processor(setting):
  from nvlm_jax.data.synthetic import corpus_texts
  from nvlm_jax.processing.processor import Processor
  from nvlm_jax.processing.tokenizer import build_tiny_tokenizer

  tokenizer = build_tiny_tokenizer(corpus_texts(300))
  return Processor(tokenizer, image_size=setting["image_size"], patch_size=setting["patch_size"], max_tiles_per_image=6)


def data_config(setting, workers, batch_size):
  from nvlm_jax.data import pipeline

  config = pipeline.default_synthetic_data_config(setting["size"])
  config.global_batch_size = batch_size
  config.seq_len = setting["seq_len"]
  config.max_tiles = 7
  config.worker_count = workers
  return config


def bench_map_only(setting, processor, seconds):
  from nvlm_jax.data.encode import EncodeRecord
  from nvlm_jax.data.synthetic import SyntheticSource

  source = SyntheticSource(100_000, 1, size=setting["size"], tile_size=setting["image_size"])
  encode = EncodeRecord(processor, seq_len=setting["seq_len"], max_tiles=7)
  encode(source[0])
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or n < 5:
    encode(source[n + 1])
    n += 1
  elapsed = time.perf_counter() - start
  return {"samples": n, "seconds": round(elapsed, 2), "samples_per_s": round(n / elapsed, 1)}


def bench_pipeline(setting, processor, workers, seconds, batch_size):
  from nvlm_jax.data import pipeline

  config = data_config(setting, workers, batch_size)
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(config, processor, seed=0)
  next(it)
  startup = time.perf_counter() - t0
  first = it.stats()
  batches, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or batches < 3:
    next(it)
    batches += 1
  elapsed = time.perf_counter() - start
  stats = it.stats()
  it.close()
  samples = stats["samples"] - first["samples"]
  rows = stats["rows"] - first["rows"]
  return {
    "startup_s": round(startup, 2),
    "batches": batches,
    "seconds": round(elapsed, 2),
    "samples_per_s": round(samples / elapsed, 1),
    "rows_per_s": round(rows / elapsed, 1),
    "samples_per_row": round(samples / max(rows, 1), 2),
    "token_fill": round((stats["tokens"] - first["tokens"]) / (rows * setting["seq_len"]), 3),
    "tile_fill": round((stats["tiles"] - first["tiles"]) / (rows * 7), 3),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per configuration")
  parser.add_argument("--settings", default="tiny,paper")
  parser.add_argument("--workers", default="0,2")
  parser.add_argument("--batch-size", type=int, default=8)
  args = parser.parse_args(argv)
  results = []
  for name in args.settings.split(","):
    setting = SETTINGS[name]
    processor = make_processor(setting)
    row = {
      "setting": name,
      "seq_len": setting["seq_len"],
      "tile_px": setting["image_size"],
      "tokens_per_tile": processor.tokens_per_tile,
      "batch_rows": args.batch_size,
      "map_only_1_thread": bench_map_only(setting, processor, args.seconds / 2),
    }
    for workers in (int(w) for w in args.workers.split(",")):
      row[f"workers_{workers}"] = bench_pipeline(setting, processor, workers, args.seconds, args.batch_size)
    results.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "results": results}, indent=2))


if __name__ == "__main__":  # grain workers are spawned: keep the entry point guarded
  main()
