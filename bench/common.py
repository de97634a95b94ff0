"""Shared pieces of the benchmarks in bench/: machine description, interleaved timing, the matmul peak,
and the small InternVL / NVLM-D model that both frameworks run with the same weights.

Why interleaved: the project machines are shared (other engineers run tests at the same time), so the
speed of the host drifts by 2x within a minute. Every benchmark therefore times ours and the reference
in ONE process, alternating them repeat by repeat (A B, B A, A B, ...), and reports medians and the
median of the per-repeat (paired) ratios, which cancels most of the drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def describe_machine(torch_threads: int | None = None) -> dict[str, Any]:
  """What ran the numbers: accelerator (jax), CPU model, cores, load, library versions."""
  import jax

  info: dict[str, Any] = {
    "jax_platform": jax.devices()[0].platform,
    "jax_device_kind": jax.devices()[0].device_kind,
    "jax_device_count": jax.device_count(),
    "jax_version": jax.__version__,
    "cpu_model": cpu_model(),
    "cpu_cores": usable_cores(),
    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    "python": platform.python_version(),
  }
  try:
    import torch

    info["torch_version"] = torch.__version__
    info["torch_device"] = torch_device()
    if torch.cuda.is_available():
      info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    info["torch_threads"] = torch.get_num_threads() if torch_threads is None else torch_threads
  except ImportError:
    pass
  try:
    import transformers

    info["transformers_version"] = transformers.__version__
  except ImportError:
    pass
  return info


def torch_device() -> str:
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def setup_torch(threads: int) -> None:
  """Reference settings: `threads` intra-op threads, 1 inter-op thread, no TF32 (fp32 is fp32)."""
  import torch

  torch.set_num_threads(threads)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:  # already set (it may be set once per process)
    pass
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False


def setup_jax_fp32() -> None:
  """fp32 matmuls at full precision (what the CPU does anyway; on a GPU it turns TF32 off)."""
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")


def sync_torch() -> None:
  import torch

  if torch.cuda.is_available():
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------
# Timing


def interleaved_timings(
  cases: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, budget_s: float | None = None
) -> dict[str, list[float]]:
  """Wall seconds of each case, `repeats` times, alternating the order every repeat.

  Each callable does one measured unit of work and returns only when it is finished (block on the
  result). `warmup` untimed calls per case come first (compilation, allocator warm-up). With
  `budget_s`, stops early (after at least 3 repeats) once the timed loop has used that much time.
  """
  names = list(cases)
  for name in names:
    for _ in range(warmup):
      cases[name]()
  times: dict[str, list[float]] = {n: [] for n in names}
  start = time.perf_counter()
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      t0 = time.perf_counter()
      cases[name]()
      times[name].append(time.perf_counter() - t0)
    if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
      break
  return times


def stats(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def paired_speedup(ours: list[float], reference: list[float]) -> dict[str, float]:
  """How many times faster ours is: reference time / our time, per repeat (paired) and of the medians."""
  pairs = [r / o for o, r in zip(ours, reference)]
  return {
    "median_of_paired": statistics.median(pairs),
    "of_medians": statistics.median(reference) / statistics.median(ours),
    "min_paired": min(pairs),
    "max_paired": max(pairs),
  }


def base_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=7, help="timed repeats per case (interleaved)")
  p.add_argument("--budget-s", type=float, default=90.0, help="stop the timed loop after ~this many seconds")
  p.add_argument("--out", default="", help="also write the JSON here")
  return p


def emit(result: dict[str, Any], out: str = "") -> None:
  """Prints (and writes) the JSON, with the load at the end and a `busy` flag in result["machine"]:
  other processes on the cores change the ratios a lot (eager PyTorch suffers far more from sharing
  the cores than XLA does), so only figures from a quiet machine compare implementations."""
  machine = result.get("machine")
  if isinstance(machine, dict):
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    loads = [machine.get("load_average_at_start", [0])[0], machine["load_average_at_end"][0]]
    machine["busy"] = bool(max(loads) > 0.75 * machine.get("cpu_cores", 1) + 1)
  text = json.dumps(result, indent=2, default=float)
  print(text)
  if out:
    Path(out).write_text(text + "\n")


def rounded(tree: Any, digits: int = 4) -> Any:
  """Floats rounded to `digits` significant digits, for readable JSON."""
  if isinstance(tree, float):
    return float(f"{tree:.{digits}g}")
  if isinstance(tree, dict):
    return {k: rounded(v, digits) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [rounded(v, digits) for v in tree]
  return tree


# ----------------------------------------------------------------------------------------------------
# The small InternVL model (transformers) and the same weights in nvlm_jax

# A "small" NVLM-D: InternViT-6B-style tower (RMSNorm, q/k norm, layer scale, no qkv bias), pixel
# shuffle 0.5, transformers' InternVL projector (with biases), Qwen2 decoder with GQA and qkv bias.
# 112 px tiles, patch 14 -> 8x8 patches (+ class token) -> 16 tokens per tile after the shuffle.
SMALL = {
  "vision": dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, image_size=112, patch_size=14
  ),
  "text": dict(
    vocab_size=4096,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1536,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
  ),
  "tiles_per_sample": 3,  # 2 regular tiles + thumbnail
}
TAG_TOKENS = 5  # `<tile_k>` is 5 text tokens for the Qwen2 tokenizer (docs/paper.md (e))


def build_reference_internvl(sizes: dict = SMALL, *, seed: int = 0, attn: str = "sdpa", std: float = 0.05):
  """A random fp32 transformers `InternVLForConditionalGeneration` (eval mode) of the given sizes.

  Weights are N(0, std) (norm scales 1 + N(0, 0.1)), larger than HF's 0.02 init so that greedy
  decoding has clear winners (argmax ties would make the token comparison meaningless).
  """
  import torch
  import transformers

  vocab = sizes["text"]["vocab_size"]
  vision = transformers.InternVLVisionConfig(
    **sizes["vision"],
    use_qk_norm=True,
    norm_type="rms_norm",
    attention_bias=False,
    use_mean_pooling=True,
    layer_norm_eps=1e-6,
  )
  text = transformers.Qwen2Config(**sizes["text"], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  config = transformers.InternVLConfig(
    vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=vocab - 1, tie_word_embeddings=False
  )
  torch.manual_seed(seed)
  model = transformers.InternVLForConditionalGeneration(config)
  for sub in (model.config, model.config.vision_config, model.config.text_config):
    sub._attn_implementation = attn
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      p.copy_(1.0 + 0.1 * noise if "norm" in name else std * noise)
  return model.eval().to(torch.float32)


def reference_and_ours(torch_threads: int):
  """The setup of every ours-vs-transformers benchmark: fp32 on both sides, `torch_threads` threads, the
  compilation cache; the SMALL reference and the same weights in nvlm_jax, scanned (the default) and
  unrolled (`load_pretrained(scan_layers=False)`).

  Returns (machine description, torch device, reference, (ours, params), (ours_unrolled, params_unrolled)).
  """
  setup_jax_fp32()
  setup_torch(torch_threads)
  enable_compilation_cache()
  machine = describe_machine(torch_threads)
  reference = build_reference_internvl(SMALL, seed=0)
  return (
    machine,
    torch_device(),
    reference,
    load_same_weights(reference),
    load_same_weights(reference, scan_layers=False),
  )


def load_same_weights(torch_model, directory: str | None = None, **load_kwargs):
  """save_pretrained -> nvlm_jax.load_pretrained: (our model, params) with the reference's weights."""
  from nvlm_jax.models import load_pretrained

  with tempfile.TemporaryDirectory() as tmp:
    target = Path(directory or tmp)
    torch_model.save_pretrained(target)
    return load_pretrained(target, **load_kwargs)


def multimodal_ids(
  batch: int,
  seq_len: int,
  *,
  tiles: int,
  tokens_per_tile: int,
  vocab: int,
  image_token_id: int,
  seed: int = 0,
  start: int = 8,
):
  """int32 [batch, seq_len]: random text with `tiles` runs of [5 tag tokens][tokens_per_tile placeholders]."""
  import numpy as np

  rng = np.random.default_rng(seed)
  ids = rng.integers(3, image_token_id, size=(batch, seq_len)).astype(np.int32)
  assert image_token_id >= vocab - 1
  for b in range(batch):
    pos = start
    for _ in range(tiles):
      pos += TAG_TOKENS
      ids[b, pos : pos + tokens_per_tile] = image_token_id
      pos += tokens_per_tile
    if pos >= seq_len:
      raise ValueError(f"seq_len={seq_len} cannot hold {tiles} tiles of {tokens_per_tile} tokens + tags")
  return ids


def random_tiles(batch: int, tiles: int, size: int, seed: int = 0):
  """float32 [batch, tiles, size, size, 3] normalized-looking pixels (channels last, as ours)."""
  import numpy as np

  return np.random.default_rng(seed).standard_normal((batch, tiles, size, size, 3)).astype(np.float32)


def training_batch(ids, pixels, image_token_id: int) -> dict:
  """The nvlm_jax training-batch dict (numpy): next-token targets, loss on text positions only."""
  import numpy as np

  batch, length = ids.shape
  targets = np.zeros_like(ids)
  targets[:, :-1] = ids[:, 1:]
  loss_mask = np.ones((batch, length), np.float32)
  loss_mask[:, -1] = 0
  loss_mask[targets == image_token_id] = 0  # never predict a placeholder
  loss_mask[ids == image_token_id] = 0
  return {
    "input_ids": ids.astype(np.int32),
    "targets": targets.astype(np.int32),
    "loss_mask": loss_mask,
    "segment_ids": np.ones((batch, length), np.int32),
    "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
    "pixel_values": pixels.astype(np.float32),
    "tile_mask": np.ones(pixels.shape[:2], bool),
  }


def torch_pixels(pixels):
  """[B, T, H, W, 3] numpy -> transformers' [B * T, 3, H, W] tensor."""
  import torch

  b, t, h, w, c = pixels.shape
  return torch.as_tensor(pixels.reshape(b * t, h, w, c)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# Our train step


ADAMW = dict(
  lr=1e-4, min_lr=1e-4, warmup_steps=0, decay_steps=10**9, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0
)  # constant lr: the reference uses torch's AdamW without a schedule


def our_train_step(model, params, trainable=("projector", "language_model"), optimizer: dict = ADAMW):
  """(jitted step(state, batch) -> (state, metrics) with the state donated, initial state, labels).

  The project's own pieces (nvlm_jax.training): trainable_labels, weight_decay_mask from the params'
  logical axes, make_optimizer (AdamW + global-norm clip, frozen group set to zero), make_train_step.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections

  from nvlm_jax import models
  from nvlm_jax.training.optimizer import make_optimizer, trainable_labels, weight_decay_mask
  from nvlm_jax.training.train_step import make_train_step, new_train_state

  labels = trainable_labels(params, trainable)
  boxed = models.abstract_variables(model, model.config)["params"]
  decay = weight_decay_mask(nn.get_partition_spec(boxed))
  tx, schedule = make_optimizer(ml_collections.ConfigDict(optimizer), labels, decay, total_steps=10**9)
  # every leaf its own buffer: new_train_state shares one zero scalar between its counters, and a
  # donated call refuses to donate one buffer twice
  state = jax.tree.map(jnp.copy, new_train_state(params, tx.init(params), jax.random.key(0)))
  step = jax.jit(make_train_step(model, tx, labels, schedule), donate_argnums=(0,))
  return step, state, labels


def random_init(model, seed: int = 0, std: float = 0.02):
  """Random params of a flax model without compiling its init: shapes from `jax.eval_shape`, values from
  numpy (norm scales 1, biases and gates 0, everything else N(0, std)). Compiling a full `init` takes
  longer than the benchmark itself on a busy 2-core host."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from nvlm_jax.training.optimizer import path_str

  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"])
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = path_str(path).split("/")[-1]
    if name == "scale":
      x = np.ones(leaf.shape, np.float32)
    elif name == "bias" or name.endswith("_gate"):
      x = np.zeros(leaf.shape, np.float32)
    else:
      x = (std * rng.standard_normal(leaf.shape)).astype(np.float32)
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, shapes)


def enable_compilation_cache(directory: str = "/tmp/nvlm_jax_bench_cache") -> None:
  """Persistent XLA compilation cache: a second run of a benchmark skips most compilation (which no
  figure includes, but which dominates the wall time on a busy 2-core host). JAX_COMPILATION_CACHE_DIR, when
  set, names the directory instead (the tests give each run its own)."""
  import jax

  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or directory
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
