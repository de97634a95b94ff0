"""Streaming HF -> orbax import: throughput against plain reads, and peak host memory, printed as JSON.

    python bench/convert_import.py [--layers 10,28] [--hidden 2048] [--compression zstd,none] [--naive]

Builds synthetic Qwen2-shaped bf16 checkpoints (weights ~ N(0, 0.02), so zstd sees realistic bytes) in
several shards under a temporary directory, then, for each size:
  plain_read      every shard read sequentially into one reused buffer (`cat > /dev/null`), cold cache
  import_<codec>  `python -m nvlm_jax.convert import` in a fresh process, cold cache; its peak RSS
                  (getrusage) against the RSS it had before converting, and against the largest tensor
  export          the first codec's import written back as sharded safetensors, fresh process, cold cache
  naive           (with --naive, largest size only) what the reported failure mode does: load the whole
                  model (`load_pretrained`) and save it with orbax `StandardSave`, in a fresh process
Cold cache: every file is dropped from the page cache (posix_fadvise DONTNEED) before each timed pass.
With the default sizes the checkpoints are ~1.0 and ~2.6 GB; the disk high-water mark stays below 8 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Runs inside the measured child process: RSS before converting, then the peak.
_CHILD = r"""
import json, resource, sys, time
import jax
sys.argv = ["convert"] + json.loads(sys.argv[1])
mode = sys.argv.pop(1)
import nvlm_jax.convert, nvlm_jax.checkpoint.convert.importer, nvlm_jax.checkpoint.hf_import, orbax.checkpoint
jax.devices()
import psutil
before = psutil.Process().memory_info().rss
usage0 = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = usage0.ru_utime + usage0.ru_stime
t0 = time.perf_counter()
if mode == "convert":
  code = nvlm_jax.convert.main(sys.argv[1:])
else:  # naive: everything in memory, then orbax
  import orbax.checkpoint as ocp, jax.numpy as jnp
  _, params = nvlm_jax.models.load_pretrained(sys.argv[1], dtype=jnp.bfloat16)
  with ocp.CheckpointManager(sys.argv[2], options=ocp.CheckpointManagerOptions(create=True,
                             enable_async_checkpointing=False)) as m:
    m.save(0, args=ocp.args.StandardSave(params))
  code = 0
seconds = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu = usage.ru_utime + usage.ru_stime - cpu0
print("BENCH" + json.dumps({"code": code, "seconds": seconds, "cpu_seconds": cpu, "rss_before": before,
                            "peak_rss": usage.ru_maxrss * 1024}))
"""


def qwen2_shapes(layers: int, hidden: int, vocab: int, heads: int, kv_heads: int, ffn: int) -> list[tuple[str, tuple]]:
  hd = hidden // heads
  out = [("model.embed_tokens.weight", (vocab, hidden))]
  for i in range(layers):
    p = f"model.layers.{i}."
    out += [
      (p + "input_layernorm.weight", (hidden,)),
      (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
      (p + "self_attn.q_proj.bias", (heads * hd,)),
      (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
      (p + "self_attn.k_proj.bias", (kv_heads * hd,)),
      (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)),
      (p + "self_attn.v_proj.bias", (kv_heads * hd,)),
      (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
      (p + "post_attention_layernorm.weight", (hidden,)),
      (p + "mlp.gate_proj.weight", (ffn, hidden)),
      (p + "mlp.up_proj.weight", (ffn, hidden)),
      (p + "mlp.down_proj.weight", (hidden, ffn)),
    ]
  out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
  return out


def write_checkpoint(directory: Path, args, layers: int) -> dict:
  import ml_dtypes
  import numpy as np

  from nvlm_jax.checkpoint.convert.shards import ShardedWriter, TensorEntry

  directory.mkdir(parents=True)
  shapes = qwen2_shapes(layers, args.hidden, args.vocab, args.heads, args.kv_heads, args.ffn)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  entries = [TensorEntry(name, shape, bf16) for name, shape in shapes]
  writer = ShardedWriter(directory, entries, max_shard_bytes=args.shard_mb * 10**6)
  rng = np.random.default_rng(0)
  for name, shape in shapes:
    if name.endswith("norm.weight"):
      value = np.ones(shape, np.float32)
    else:
      value = rng.standard_normal(shape, dtype=np.float32) * 0.02
    writer.write(name, value.astype(bf16))
  writer.close()
  config = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": args.vocab,
    "hidden_size": args.hidden,
    "intermediate_size": args.ffn,
    "num_hidden_layers": layers,
    "num_attention_heads": args.heads,
    "num_key_value_heads": args.kv_heads,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
  }
  (directory / "config.json").write_text(json.dumps(config))
  sizes = [math.prod(s) * 2 for _, s in shapes]
  slices = [math.prod(s) * 2 for n, s in shapes if ".layers." in n]
  return {
    "bytes": sum(sizes),
    "shards": len(writer.files),
    "tensors": len(shapes),
    "largest_tensor_bytes": max(sizes),
    "largest_layer_slice_bytes": max(slices),
  }


def drop_cache(paths) -> None:
  for path in paths:
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
      fd = os.open(f, os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def plain_read(directory: Path) -> dict:
  files = sorted(directory.glob("*.safetensors"))
  drop_cache(files)
  buffer = bytearray(16 * 2**20)
  view = memoryview(buffer)
  total = 0
  start, cpu0 = time.perf_counter(), time.process_time()
  for f in files:
    with open(f, "rb", buffering=0) as handle:
      while n := handle.readinto(view):
        total += n
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
  return {
    "seconds": round(seconds, 3),
    "GBps": round(total / seconds / 1e9, 3),
    "bytes": total,
    "cpu_seconds_per_GB": round(cpu / (total / 1e9), 2),
  }


def run_child(mode: str, argv: list[str]) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD, json.dumps([mode] + argv)], env=env, capture_output=True, text=True
  )
  line = next((out for out in proc.stdout.splitlines() if out.startswith("BENCH")), None)
  if proc.returncode != 0 or line is None:
    raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads(line[len("BENCH") :])


def measured(result: dict, source: dict, read: dict, out: Path) -> dict:
  from nvlm_jax.checkpoint.orbax_stream import stored_bytes

  extra = result["peak_rss"] - result["rss_before"]
  return {
    "seconds": round(result["seconds"], 3),
    "GBps": round(source["bytes"] / result["seconds"] / 1e9, 3),
    # CPU time (all threads) does not depend on what else runs on the host, unlike wall time.
    "cpu_seconds": round(result["cpu_seconds"], 2),
    "cpu_seconds_per_GB": round(result["cpu_seconds"] / (source["bytes"] / 1e9), 2),
    "throughput_vs_plain_read": round(source["bytes"] / result["seconds"] / 1e9 / read["GBps"], 3),
    "rss_before_bytes": result["rss_before"],
    "peak_rss_bytes": result["peak_rss"],
    "peak_rss_above_start_bytes": extra,
    "peak_rss_above_start_vs_largest_tensor": round(extra / source["largest_tensor_bytes"], 2),
    "peak_rss_above_start_vs_checkpoint": round(extra / source["bytes"], 3),
    "stored_bytes": stored_bytes(out),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", default="10,28", help="comma-separated layer counts (one checkpoint each)")
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--ffn", type=int, default=5504)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--shard-mb", type=int, default=500)
  parser.add_argument("--compression", default="zstd,none")
  parser.add_argument("--naive", action="store_true", help="also measure load-everything + orbax save")
  parser.add_argument(
    "--no-export",
    dest="export",
    action="store_false",
    help="skip timing `export` of the first codec's import back to safetensors",
  )
  parser.add_argument("--workdir", default=None, help="where to build (default: a temporary directory)")
  args = parser.parse_args()

  root = Path(args.workdir or tempfile.mkdtemp(prefix="nvlm_convert_bench_"))
  report = {
    "host": {
      "cpus": os.cpu_count(),
      "python": platform.python_version(),
      "machine": platform.machine(),
      "load_average_at_start": os.getloadavg(),
    },
    "runs": [],
  }
  try:
    sizes = [int(x) for x in args.layers.split(",")]
    for layers in sizes:
      source_dir = root / f"qwen2_{layers}l"
      t0 = time.perf_counter()
      source = write_checkpoint(source_dir, args, layers)
      run = {"layers": layers, "checkpoint": source, "build_seconds": round(time.perf_counter() - t0, 1)}
      run["plain_read"] = plain_read(source_dir)
      for codec in args.compression.split(","):
        out = root / f"out_{layers}_{codec}"
        drop_cache([source_dir])
        result = run_child(
          "convert", ["import", "--hf-dir", str(source_dir), "--out", str(out), "--quiet", "--compression", codec]
        )
        run[f"import_{codec}"] = measured(result, source, run["plain_read"], out)
        if args.export and codec == args.compression.split(",")[0]:
          exported = root / f"exported_{layers}"
          drop_cache([out])
          result = run_child(
            "convert", ["export", "--checkpoint", str(out), "--out", str(exported), "--layout", "qwen2", "--quiet"]
          )
          run["export"] = measured(result, source, run["plain_read"], exported)
          shutil.rmtree(exported)
        shutil.rmtree(out)
      if args.naive and layers == sizes[-1]:
        out = root / f"naive_{layers}"
        drop_cache([source_dir])
        result = run_child("naive", [str(source_dir), str(out)])
        run["naive_load_then_orbax_save"] = measured(result, source, run["plain_read"], out)
        shutil.rmtree(out)
      shutil.rmtree(source_dir)
      run["load_average"] = os.getloadavg()
      report["runs"].append(run)
      print(json.dumps(run), file=sys.stderr)
  finally:
    if args.workdir is None:
      shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
