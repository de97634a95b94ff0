"""Greedy generation: nvlm_jax `generate` vs transformers `generate` (InternVL, PyTorch), same weights.

    python bench/generate_vs_torch.py [--batch 4] [--prompt-len 128] [--new-tokens 64] [--repeats 4]

Model: the SMALL NVLM-D of bench/common.py (random fp32 transformers InternVL, saved and loaded with
`nvlm_jax.load_pretrained`). Prompts: `batch` rows of `prompt-len` tokens, each with 2 tiles + thumbnail
(3 x 16 image tokens), all rows the same length (no padding). Both sides decode greedily exactly
`new-tokens` tokens (EOS disabled: our `eos_token_id=()`, the reference's generation config without an
EOS id), with a KV cache; images enter at the prefill only.

Timed, interleaved in one process (bench/README.md "How the numbers are taken"), per side:
- `generate` of `new-tokens` tokens (the whole call; tokens/s = batch * new_tokens / time), and
- `generate` of 1 token: the prefill (ViT, projector, prompt through the decoder, first token).
  One decode step = (whole - prefill) / (new_tokens - 1), from the per-repeat (paired) times.
Ours: scanned layers (the default; the decode steps read per-layer views of the stacked weights, see
`nvlm_jax/layer_views.py`), unrolled layers (`load_pretrained(scan_layers=False)`), and `scanned_sliced`:
the scanned model decoding the old way, slicing (copying) every layer's weights out of the stacks each step.

Weight-streaming floor: a decode step must read the language model's weights once (decoder layers, final
norm, LM head; the embedding row is negligible). Floor = the fastest of the interleaved passes of a jitted sum
over an array of exactly those bytes (same size, so the same cache behaviour; the fastest pass is the hardware's
bound, the load slows the median). `decode_step_over_floor` is our median step / the floor.

Memory (`--no-memory` skips it): a child process builds a text-only scanned decoder with ~200 MB of fp32
weights, compiles each way of decoding once, then reports the peak resident set (VmHWM, reset before each
measured call) above the resident set before it: views (what `generate` does), sliced (old), and unstacking
into per-layer copies (what converting inside `generate` would cost). glibc's mmap threshold is pinned in the
child so that freed buffers go back to the system and the resident set before each call is honest. The
scanned prefill's layer scan holds one layer's weights as a temporary in every case.

Sanity: the generated tokens must be identical (fraction of equal tokens and first mismatch reported).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import common


def streaming_pass(nbytes: int):
  """One timed unit for the floor: a jitted sum reading an fp32 array of `nbytes` (compiled on the first call)."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return lambda: total(x).block_until_ready()


def language_weight_bytes(params) -> int:
  """Bytes a decode step reads: the language model's params except the token embedding table."""
  import jax

  language = params.get("language_model", params)
  leaves = jax.tree_util.tree_leaves_with_path(language)
  return sum(x.nbytes for path, x in leaves if "embed_tokens" not in jax.tree_util.keystr(path))


@contextmanager
def sliced_decoding():
  """Decode a scanned model the way generate did before layer views: the stacks sliced at every step."""
  from nvlm_jax import generation

  saved = generation.decoding_layout
  generation.decoding_layout = lambda model, params: (model, params)
  try:
    yield
  finally:
    generation.decoding_layout = saved


# ----------------------------------------------------------------------------------------------------
# Peak memory of one decode, in a child process (a forked child would start with this process's pages).


def memory_probe() -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from nvlm_jax.generation import generate
  from nvlm_jax.language.decoder import CausalLM
  from nvlm_jax.presets import get_preset

  cfg = get_preset("tiny_llm").replace(
    vocab_size=4096, hidden_size=1024, num_layers=4, num_heads=16, num_kv_heads=4, intermediate_size=2816
  )
  model = CausalLM(cfg)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])()
  params = jax.tree.map(lambda x: x * 0.05 if x.ndim > 1 else x, params)  # small logits: no argmax ties
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 64)).astype(np.int32)

  def run(p):
    return np.asarray(generate(model, p, ids, max_new_tokens=8, eos_token_id=()))

  def unstacked_copies():
    """What converting inside generate would hold: per-layer copies beside the caller's stacks."""
    layers = params["decoder"]["layers"]
    copies = {f"layers_{i}": jax.tree.map(lambda x, i=i: jnp.array(x[i]), layers) for i in range(cfg.num_layers)}
    from nvlm_jax.layer_views import unrolled_module

    p = {**params, "decoder": copies}
    return np.asarray(generate(unrolled_module(model), p, ids, max_new_tokens=8, eos_token_id=()))

  def status(field: str) -> int:
    for line in open("/proc/self/status"):
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")

  def sliced():
    with sliced_decoding():
      return run(params)

  # unstacked copies last: what it frees could otherwise be reused, unseen, by a later case
  cases = {"sliced": sliced, "views": lambda: run(params), "unstacked_copies": unstacked_copies}
  layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params["decoder"]["layers"])) // cfg.num_layers
  out, tokens = {"weight_bytes": weight_bytes, "layer_bytes": layer_bytes}, {}
  for fn in cases.values():
    fn()  # compile outside the measured calls
  for name, fn in cases.items():
    peaks = []
    for _ in range(2):  # the larger of two: a call may reuse pages an earlier one left resident
      gc.collect()  # drop what earlier calls left in reference cycles, so the resident set before is honest
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
      before = status("VmRSS")
      tokens[name] = fn()
      peaks.append(status("VmHWM") - before)
    out[f"{name}_peak_above_before_bytes"] = max(peaks)
  out["tokens_identical"] = all(np.array_equal(t, tokens["views"]) for t in tokens.values())
  return out


def measure_memory() -> dict:
  """memory_probe() in a fresh interpreter, on one CPU device."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # large buffers are mmapped and unmapped when freed
  done = subprocess.run(
    [sys.executable, __file__, "--memory-probe"], capture_output=True, text=True, env=env, timeout=300, check=False
  )
  if done.returncode != 0:
    raise RuntimeError(f"memory probe failed:\n{done.stderr[-3000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  mb = 2**20
  return {
    "weights_mb": result["weight_bytes"] / mb,
    "one_layer_mb": result["layer_bytes"] / mb,
    "peak_above_before_mb": {
      k.removesuffix("_peak_above_before_bytes"): v / mb for k, v in result.items() if k.endswith("_above_before_bytes")
    },
    "tokens_identical": result["tokens_identical"],
  }


# ----------------------------------------------------------------------------------------------------


def main():
  if "--memory-probe" in sys.argv:
    print(json.dumps(memory_probe()))
    return
  p = common.base_parser(__doc__)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process")
  p.set_defaults(repeats=4, budget_s=40.0)
  args = p.parse_args()
  if args.new_tokens < 2:
    p.error("--new-tokens must be >= 2 (a decode step is the difference to a 1-token generate)")

  machine, device, ref, (ours, params), (ours_unrolled, params_unrolled) = common.reference_and_ours(args.torch_threads)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from nvlm_jax.generation import generate

  cfg = ours.config
  ref = ref.to(device)
  ref.generation_config.eos_token_id = None
  ref.generation_config.pad_token_id = 0
  ref.generation_config.bos_token_id = None

  tiles = common.SMALL["tiles_per_sample"]
  ids = common.multimodal_ids(
    args.batch,
    args.prompt_len,
    tiles=tiles,
    tokens_per_tile=cfg.tokens_per_tile,
    vocab=cfg.llm.vocab_size,
    image_token_id=cfg.image_token_id,
    seed=3,
  )
  pixels = common.random_tiles(args.batch, tiles, cfg.vision.image_size, seed=4)
  mask = np.ones_like(ids)
  tile_mask = jnp.ones((args.batch, tiles), bool)
  j_pixels = jnp.asarray(pixels)
  t_ids = torch.as_tensor(ids, dtype=torch.long, device=device)
  t_mask = torch.ones_like(t_ids)
  t_px = common.torch_pixels(pixels).to(device)

  def ours_generate(model, params, new_tokens):
    out = generate(
      model,
      params,
      ids,
      attention_mask=mask,
      pixel_values=j_pixels,
      tile_mask=tile_mask,
      max_new_tokens=new_tokens,
      eos_token_id=(),
      pad_token_id=0,
    )
    return np.asarray(jax.block_until_ready(out))

  def ref_generate(new_tokens):
    with torch.no_grad():
      out = ref.generate(
        input_ids=t_ids,
        attention_mask=t_mask,
        pixel_values=t_px,
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
      )
    common.sync_torch()
    return out[:, args.prompt_len :].cpu().numpy()

  def sliced(new_tokens):
    with sliced_decoding():
      return ours_generate(ours, params, new_tokens)

  n = args.new_tokens
  cases = {
    "ours": lambda: ours_generate(ours, params, n),
    "ours_prefill": lambda: ours_generate(ours, params, 1),
    "ours_unrolled": lambda: ours_generate(ours_unrolled, params_unrolled, n),
    "ours_unrolled_prefill": lambda: ours_generate(ours_unrolled, params_unrolled, 1),
    "ours_scanned_sliced": lambda: sliced(n),
    "reference": lambda: ref_generate(n),
    "reference_prefill": lambda: ref_generate(1),
  }
  first_call_s, tokens = {}, {}
  for name, fn in cases.items():  # compiles ours; the first call of each is not timed
    t0 = time.perf_counter()
    tokens[name] = fn()
    first_call_s[name] = time.perf_counter() - t0
  ours_tokens, ref_tokens = tokens["ours"], tokens["reference"]
  same = ours_tokens == ref_tokens
  mismatch_rows = [int(r) for r in np.flatnonzero(~same.all(axis=1))]
  sanity = {
    "shapes": {"ours": list(ours_tokens.shape), "reference": list(ref_tokens.shape)},
    "identical": bool(same.all()),
    "fraction_equal": float(same.mean()),
    "rows_differing": mismatch_rows,
    "first_mismatch_step": [int(np.argmin(same[r])) for r in mismatch_rows],
    "distinct_tokens_generated": int(len(np.unique(ours_tokens))),
    "unrolled_identical": bool((tokens["ours_unrolled"] == ref_tokens).all()),
    "scanned_sliced_identical": bool((tokens["ours_scanned_sliced"] == ref_tokens).all()),
    "prefill_first_token_identical": bool(
      all(
        (tokens[k][:, 0] == ref_tokens[:, 0]).all()
        for k in ("ours_prefill", "ours_unrolled_prefill", "reference_prefill")
      )
    ),
  }

  loads = []
  timed = {name: (lambda fn=fn: (fn(), loads.append(os.getloadavg()[0]))) for name, fn in cases.items()}
  weight_bytes = language_weight_bytes(params)
  timed["stream_weight_bytes"] = streaming_pass(weight_bytes)
  timed["stream_weight_bytes"]()  # compile
  times = common.interleaved_timings(timed, repeats=args.repeats, warmup=0, budget_s=args.budget_s)
  floor_s = min(times["stream_weight_bytes"])
  bytes_per_s = weight_bytes / floor_s

  def per_step(whole: str, prefill: str) -> list[float]:
    return [(w - p) / (n - 1) for w, p in zip(times[whole], times[prefill])]

  steps = {
    "ours": per_step("ours", "ours_prefill"),
    "ours_unrolled": per_step("ours_unrolled", "ours_unrolled_prefill"),
    "ours_scanned_sliced": per_step("ours_scanned_sliced", "ours_prefill"),  # same (scanned) prefill
    "reference": per_step("reference", "reference_prefill"),
  }
  tokens_total = args.batch * n
  result = {
    "benchmark": "generate_vs_torch",
    "machine": machine,
    "setup": {
      "model": "NVLM-D small (transformers InternVLForConditionalGeneration layout)",
      "vision": common.SMALL["vision"],
      "text": common.SMALL["text"],
      "tiles_per_sample": tiles,
      "tokens_per_tile": cfg.tokens_per_tile,
      "batch": args.batch,
      "prompt_len": args.prompt_len,
      "new_tokens": n,
      "dtype": "float32",
      "greedy": True,
      "eos": "disabled",
      "reference": f"transformers generate (do_sample=False, KV cache), SDPA, {args.torch_threads} threads, "
      f"device {device}",
      "ours": "nvlm_jax.generate: one jitted prefill + lax.while_loop decode; layers scanned (the default), "
      "decode steps over per-layer views of the stacks",
      "ours_unrolled": "the same, weights loaded with load_pretrained(scan_layers=False)",
      "ours_scanned_sliced": "scanned, decode steps slicing the stacks (generate before layer views)",
      "first_call_s_incl_compile": first_call_s,
    },
    "sanity": sanity,
  }
  for name in ("ours", "ours_unrolled", "ours_scanned_sliced", "reference"):
    s = common.stats(times[name])
    s["tokens_per_s"] = tokens_total / s["median_s"]
    s["ms_per_token_step"] = 1e3 * s["median_s"] / n  # prefill included
    prefill = "ours_prefill" if name == "ours_scanned_sliced" else f"{name}_prefill"
    s["prefill_median_s"] = statistics.median(times[prefill])
    s["decode_step_median_ms"] = 1e3 * statistics.median(steps[name])
    result[name] = s
  result["speedup_ours_vs_reference"] = common.paired_speedup(times["ours"], times["reference"])
  result["speedup_ours_unrolled_vs_reference"] = common.paired_speedup(times["ours_unrolled"], times["reference"])
  result["decode_step_speedup_vs_reference"] = {
    k: common.paired_speedup(steps[k], steps["reference"])["median_of_paired"] for k in steps if k != "reference"
  }
  result["weight_streaming_floor"] = {
    "language_weight_mb": weight_bytes / 2**20,
    "host_streaming_gb_per_s": bytes_per_s / 1e9,
    "host_streaming_gb_per_s_median": weight_bytes / statistics.median(times["stream_weight_bytes"]) / 1e9,
    "floor_ms": 1e3 * floor_s,
    "decode_step_over_floor": {k: statistics.median(steps[k]) / floor_s for k in steps if k != "reference"},
  }
  result["load_average_during_timing"] = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
  if not args.no_memory:
    result["memory"] = measure_memory()
  result["summary"] = {
    "speedup_scanned": result["speedup_ours_vs_reference"]["median_of_paired"],
    "speedup_unrolled": result["speedup_ours_unrolled_vs_reference"]["median_of_paired"],
    "prefill_s": {k: result[k]["prefill_median_s"] for k in ("ours", "ours_unrolled", "reference")},
    "decode_step_ms": {k: result[k]["decode_step_median_ms"] for k in steps},
    "floor_ms": result["weight_streaming_floor"]["floor_ms"],
    "tokens_identical": sanity["identical"] and sanity["unrolled_identical"] and sanity["scanned_sliced_identical"],
    "load_average_median": result["load_average_during_timing"]["median"],
  }
  common.emit(common.rounded(result), args.out)


if __name__ == "__main__":
  main()
