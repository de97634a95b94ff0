"""NVLM-D forward and train-step throughput: nvlm_jax vs transformers InternVL (PyTorch), same weights.

    python bench/train_step_vs_torch.py [--batch 2] [--seq-len 512] [--repeats 7] [--torch-threads 2]

The reference is a random fp32 `transformers.InternVLForConditionalGeneration` of the SMALL sizes in
bench/common.py (ViT 4 x 256, LLM 4 x 512 with GQA 8/2 heads, vocab 4096, 2 tiles + thumbnail of
112 px / patch 14 = 3 x 16 image tokens in a 512-token row). It is written with `save_pretrained` and
loaded with `nvlm_jax.load_pretrained`, so both run the same weights on the same batch.

Train step (both): fwd + bwd + AdamW (betas 0.9/0.95, wd 0.1 on matrices, constant lr 1e-4, global-norm
clip 1.0); ViT frozen (requires_grad False / stop_gradient), projector + LLM trained; per-token cross
entropy over the text positions. Ours is `nvlm_jax.training.train_step.make_train_step` jitted with the
state donated; the reference is eager PyTorch (default SDPA attention) with `torch.optim.AdamW`.
Also timed: our train step with unrolled layers (`load_pretrained(scan_layers=False)`), which XLA's CPU
backend runs faster than the scanned default. Forward: loss only (no grad). Sanity: step-0 loss and
gradient norm, and the loss after 3 updates, must agree between the two (fp32).

Prints JSON: samples/s of both, speedup = reference time / our time (median of the per-repeat paired
ratios and ratio of medians), the sanity numbers and the machine.
"""

from __future__ import annotations

import time

import common


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--sanity-steps", type=int, default=3)
  args = p.parse_args()

  t0 = time.perf_counter()
  machine, device, ref, (ours, params), (ours_unrolled, params_unrolled) = common.reference_and_ours(args.torch_threads)
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F

  from nvlm_jax.training.loss import masked_loss_sum

  cfg = ours.config
  ref = ref.to(device)
  setup_s = time.perf_counter() - t0

  tiles = common.SMALL["tiles_per_sample"]
  ids = common.multimodal_ids(
    args.batch,
    args.seq_len,
    tiles=tiles,
    tokens_per_tile=cfg.tokens_per_tile,
    vocab=cfg.llm.vocab_size,
    image_token_id=cfg.image_token_id,
    seed=1,
  )
  pixels = common.random_tiles(args.batch, tiles, cfg.vision.image_size, seed=2)
  batch_np = common.training_batch(ids, pixels, cfg.image_token_id)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  t_ids = torch.as_tensor(ids, dtype=torch.long, device=device)
  t_px = common.torch_pixels(pixels).to(device)
  t_targets = torch.as_tensor(batch_np["targets"], dtype=torch.long, device=device).flatten()
  t_mask = torch.as_tensor(batch_np["loss_mask"], device=device).flatten()
  denominator = float(batch_np["loss_mask"].sum())

  # --- ours -------------------------------------------------------------------------------------
  trainable = ("projector", "language_model")
  train_step, state, _ = common.our_train_step(ours, params, trainable)
  unrolled_step, unrolled_state, _ = common.our_train_step(ours_unrolled, params_unrolled, trainable)

  def forward_loss(p, b):
    logits = ours.apply(
      {"params": p},
      b["input_ids"],
      positions=b["positions"],
      segment_ids=b["segment_ids"],
      pixel_values=b["pixel_values"],
      tile_mask=b["tile_mask"],
    )
    total, count = masked_loss_sum(logits, b["targets"], b["loss_mask"])
    return total / count

  forward = jax.jit(forward_loss)

  # --- reference --------------------------------------------------------------------------------
  ref.model.vision_tower.requires_grad_(False)
  ref_params = [p for p in ref.parameters() if p.requires_grad]
  decay_group = [p for p in ref_params if p.ndim >= 2]  # matrices, as weight_decay_mask
  other_group = [p for p in ref_params if p.ndim < 2]  # biases, norm scales
  adamw = common.ADAMW
  ref_opt = torch.optim.AdamW(
    [{"params": decay_group, "weight_decay": adamw["weight_decay"]}, {"params": other_group, "weight_decay": 0.0}],
    lr=adamw["lr"],
    betas=(adamw["b1"], adamw["b2"]),
    eps=adamw["eps"],
  )

  def ref_loss():
    logits = ref(input_ids=t_ids, pixel_values=t_px, use_cache=False).logits
    ce = F.cross_entropy(logits.flatten(0, 1).float(), t_targets, reduction="none")
    return (ce * t_mask).sum() / denominator

  def ref_train_step():
    ref_opt.zero_grad(set_to_none=True)
    loss = ref_loss()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref_params, adamw["grad_clip"])
    ref_opt.step()
    common.sync_torch()
    return float(loss.detach()), float(norm)

  def ref_forward():
    with torch.no_grad():
      loss = ref_loss()
    common.sync_torch()
    return float(loss)

  # --- sanity: same loss, same gradient norm, same trajectory ------------------------------------
  t0 = time.perf_counter()
  fwd_ours = float(forward(state.params, batch))
  fwd_compile_s = time.perf_counter() - t0
  fwd_ref = ref_forward()
  ours_traj, ref_traj = [], []
  t0 = time.perf_counter()
  for i in range(args.sanity_steps + 1):
    state, metrics = train_step(state, batch)
    ours_traj.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    if i == 0:
      train_compile_s = time.perf_counter() - t0
    ref_traj.append(ref_train_step())
  sanity = {
    "forward_loss": {"ours": fwd_ours, "reference": fwd_ref, "abs_diff": abs(fwd_ours - fwd_ref)},
    "step0_loss": {
      "ours": ours_traj[0][0],
      "reference": ref_traj[0][0],
      "abs_diff": abs(ours_traj[0][0] - ref_traj[0][0]),
    },
    "step0_grad_norm": {
      "ours": ours_traj[0][1],
      "reference": ref_traj[0][1],
      "rel_diff": abs(ours_traj[0][1] - ref_traj[0][1]) / ref_traj[0][1],
    },
    f"loss_after_{args.sanity_steps}_updates": {
      "ours": ours_traj[-1][0],
      "reference": ref_traj[-1][0],
      "abs_diff": abs(ours_traj[-1][0] - ref_traj[-1][0]),
    },
  }
  sanity["agree"] = bool(
    sanity["step0_loss"]["abs_diff"] < 1e-3
    and sanity["step0_grad_norm"]["rel_diff"] < 1e-3
    and sanity[f"loss_after_{args.sanity_steps}_updates"]["abs_diff"] < 1e-2
  )

  # --- timing -----------------------------------------------------------------------------------
  holder = {"state": state, "unrolled": unrolled_state}

  def ours_train():
    holder["state"], m = train_step(holder["state"], batch)
    jax.block_until_ready(m["loss"])

  def ours_unrolled_train():
    holder["unrolled"], m = unrolled_step(holder["unrolled"], batch)
    jax.block_until_ready(m["loss"])

  t0 = time.perf_counter()
  ours_unrolled_train()  # compile
  unrolled_compile_s = time.perf_counter() - t0

  def ours_forward():
    jax.block_until_ready(forward(holder["state"].params, batch))

  # Both sides already ran (compiled, allocated) in the sanity part: no further warm-up.
  fwd_times = common.interleaved_timings(
    {"ours": ours_forward, "reference": ref_forward}, repeats=args.repeats, warmup=0, budget_s=args.budget_s / 3
  )
  train_times = common.interleaved_timings(
    {"ours": ours_train, "ours_unrolled": ours_unrolled_train, "reference": ref_train_step},
    repeats=args.repeats,
    warmup=0,
    budget_s=args.budget_s,
  )

  def report(times):
    out = {}
    for name in times:
      s = common.stats(times[name])
      s["samples_per_s"] = args.batch / s["median_s"]
      out[name] = s
    for name in times:
      if name != "reference":
        out[f"speedup_{name}_vs_reference"] = common.paired_speedup(times[name], times["reference"])
    return out

  result = {
    "benchmark": "train_step_vs_torch",
    "machine": machine,
    "setup": {
      "model": "NVLM-D small (transformers InternVLForConditionalGeneration layout)",
      "vision": common.SMALL["vision"],
      "text": common.SMALL["text"],
      "tiles_per_sample": tiles,
      "tokens_per_tile": cfg.tokens_per_tile,
      "batch": args.batch,
      "seq_len": args.seq_len,
      "dtype": "float32",
      "trainable": list(trainable),
      "frozen": ["vision_model"],
      "reference": f"PyTorch eager, SDPA attention, torch.optim.AdamW, {args.torch_threads} threads, device {device}",
      "ours": "jax.jit(make_train_step) with donated state, layers scanned (the default)",
      "ours_unrolled": "the same with load_pretrained(scan_layers=False) (train step only)",
      "ours_unrolled_train_compile_s": unrolled_compile_s,
      "setup_s": setup_s,
      "ours_forward_compile_s": fwd_compile_s,
      "ours_train_compile_s": train_compile_s,
    },
    "sanity": sanity,
    "forward": report(fwd_times),
    "train_step": report(train_times),
  }
  common.emit(common.rounded(result), args.out)


if __name__ == "__main__":
  main()
