"""Greedy generation throughput: nvlm_jax `generate` vs transformers `generate` (InternVL, PyTorch), same weights.

    python bench/generate_vs_torch.py [--batch 4] [--prompt-len 128] [--new-tokens 64] [--repeats 5]

Model: the SMALL NVLM-D of bench/common.py (random fp32 transformers InternVL, saved and loaded with
`nvlm_jax.load_pretrained`). Prompts: `batch` rows of `prompt-len` tokens, each with 2 tiles + thumbnail
(3 x 16 image tokens), all rows the same length (no padding). Both sides decode greedily exactly
`new-tokens` tokens (EOS disabled: our `eos_token_id=()`, the reference's generation config without an
EOS id), with a KV cache; images enter at the prefill only. One timed unit = one whole `generate` call
(prefill + all decode steps) for the batch; tokens/s = batch * new_tokens / time.

Also timed: ours with unrolled layers (`load_pretrained(scan_layers=False)`): decoding is bound by reading
the weights, and a scanned decoder copies every layer's weights out of the stacked arrays at each step.

Sanity: the generated tokens must be identical (fraction of equal tokens and first mismatch reported).
"""

from __future__ import annotations

import time

import common


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--torch-threads", type=int, default=2)
  p.set_defaults(repeats=4, budget_s=75.0)
  args = p.parse_args()

  # Unrolled layers are timed too: a scanned decoder slices (copies) every layer's weights out of the
  # stacked arrays at every decode step.
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

  def ours_generate(model=ours, params=params):
    out = generate(
      model,
      params,
      ids,
      attention_mask=mask,
      pixel_values=j_pixels,
      tile_mask=tile_mask,
      max_new_tokens=args.new_tokens,
      eos_token_id=(),
      pad_token_id=0,
    )
    return np.asarray(jax.block_until_ready(out))

  def ours_unrolled_generate():
    return ours_generate(ours_unrolled, params_unrolled)

  def ref_generate():
    with torch.no_grad():
      out = ref.generate(
        input_ids=t_ids,
        attention_mask=t_mask,
        pixel_values=t_px,
        max_new_tokens=args.new_tokens,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
      )
    common.sync_torch()
    return out[:, args.prompt_len :].cpu().numpy()

  t0 = time.perf_counter()
  ours_tokens = ours_generate()
  first_call_s = time.perf_counter() - t0
  ref_tokens = ref_generate()
  unrolled_tokens = ours_unrolled_generate()
  same = ours_tokens == ref_tokens
  mismatch_rows = [int(r) for r in np.flatnonzero(~same.all(axis=1))]
  first_mismatch = [int(np.argmin(same[r])) for r in mismatch_rows]
  sanity = {
    "shapes": {"ours": list(ours_tokens.shape), "reference": list(ref_tokens.shape)},
    "identical": bool(same.all()),
    "fraction_equal": float(same.mean()),
    "rows_differing": mismatch_rows,
    "first_mismatch_step": first_mismatch,
    "distinct_tokens_generated": int(len(np.unique(ours_tokens))),
    "unrolled_identical": bool((unrolled_tokens == ref_tokens).all()),
  }

  times = common.interleaved_timings(
    {"ours": ours_generate, "ours_unrolled": ours_unrolled_generate, "reference": ref_generate},
    repeats=args.repeats,
    warmup=0,
    budget_s=args.budget_s,
  )  # all ran once above
  tokens = args.batch * args.new_tokens
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
      "new_tokens": args.new_tokens,
      "dtype": "float32",
      "greedy": True,
      "eos": "disabled",
      "reference": f"transformers generate (do_sample=False, KV cache), SDPA, {args.torch_threads} threads, "
      f"device {device}",
      "ours": "nvlm_jax.generate: one jitted prefill + lax.while_loop decode; layers scanned (the default)",
      "ours_unrolled": "the same, weights loaded with load_pretrained(scan_layers=False)",
      "ours_first_call_s_incl_compile": first_call_s,
    },
    "sanity": sanity,
  }
  for name in ("ours", "ours_unrolled", "reference"):
    s = common.stats(times[name])
    s["tokens_per_s"] = tokens / s["median_s"]
    s["ms_per_token_step"] = 1e3 * s["median_s"] / args.new_tokens  # prefill included
    result[name] = s
  result["speedup_ours_vs_reference"] = common.paired_speedup(times["ours"], times["reference"])
  result["speedup_ours_unrolled_vs_reference"] = common.paired_speedup(times["ours_unrolled"], times["reference"])
  common.emit(common.rounded(result), args.out)


if __name__ == "__main__":
  main()
