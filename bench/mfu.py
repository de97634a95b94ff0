"""Model FLOPs utilization of our NVLM-D train step against this device's measured dense-matmul peak.

    python bench/mfu.py [--hidden 1024] [--layers 4] [--seq-len 512] [--batch 1] [--peak-tflops 0] [--attention-impl auto]
    # a GPU host (bf16 compute, fp32 master weights; the peak is measured in bf16 too):
    python bench/mfu.py --dtype bfloat16 --hidden 4096 --layers 8 --heads 32 --kv-heads 8 \
        --intermediate 11008 --seq-len 2048 --batch 8 --peak-n 8192

Model: an NVLM-D with random weights: the SMALL ViT of bench/common.py (4 x 256, 112 px tiles, 3 tiles
per row, frozen) + NVLM-D's bias-free mlp1 projector + a Qwen2-style LLM (default hidden 1024, 4 layers,
16/4 heads, SwiGLU 2816, vocab 4096), big enough that the step is dominated by matmuls.
Train step: `nvlm_jax.training.train_step.make_train_step` (AdamW, projector + LLM trained), jitted,
state donated.

FLOPs per step:
  analytic  nvlm_jax/training/flops.py `train_step_flops` (model FLOPs: no remat recompute, causal
            attention halved, ViT forward only)
  xla       `cost_analysis()` of the same step lowered with unrolled layers (XLA counts a scanned layer
            body once, so the scanned program would under-report by the layer count); counts what the
            program executes, optimizer and elementwise work included
Peak: a jitted [n, n] @ [n, n] matmul in the compute dtype (n = --peak-n: 2048 on CPU, 8192 on an
accelerator), timed in the same run, interleaved with the train steps (so both see the same machine load);
or --peak-tflops.
MFU = FLOPs per step / step time / peak, reported per repeat-pair and as the median.
"""

from __future__ import annotations

import statistics
import time

import common


def build_model(args):
  from nvlm_jax.config import DecoderConfig, NVLMConfig, ProjectorConfig, VisionConfig
  from nvlm_jax.fusion.nvlm_d import NVLMD

  v = common.SMALL["vision"]
  dtype, pdtype = args.dtype, "float32"
  vision = VisionConfig(
    image_size=v["image_size"],
    patch_size=v["patch_size"],
    hidden_size=v["hidden_size"],
    num_layers=v["num_hidden_layers"],
    num_heads=v["num_attention_heads"],
    intermediate_size=v["intermediate_size"],
    norm_type="rms_norm",
    qk_normalization=True,
    qkv_bias=False,
    use_class_token=True,
    dtype=dtype,
    param_dtype=pdtype,
    scan_layers=not args.unrolled,
    attention_impl=args.attention_impl,
  )
  llm = DecoderConfig(
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    num_layers=args.layers,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    intermediate_size=args.intermediate,
    rope_theta=1e6,
    qkv_bias=True,
    max_position_embeddings=max(4096, args.seq_len),
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    dtype=dtype,
    param_dtype=pdtype,
    scan_layers=not args.unrolled,
    remat_policy=args.remat,
    attention_impl=args.attention_impl,
  )
  projector = ProjectorConfig(
    in_features=4 * vision.hidden_size,
    hidden_size=llm.intermediate_size,
    out_features=llm.hidden_size,
    num_layers=2,
    use_bias=False,
    dtype=dtype,
    param_dtype=pdtype,
  )
  config = NVLMConfig(variant="d", vision=vision, projector=projector, llm=llm, image_token_id=args.vocab - 1)
  return NVLMD(config)


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=4)
  p.add_argument("--intermediate", type=int, default=2816)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", default="", help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
  p.add_argument("--attention-impl", default="auto", help="auto | xla | blocked | cudnn | splash (LLM and ViT)")
  p.add_argument("--remat", default="none", help="LLM remat policy (nvlm_jax.layers.remat.POLICIES)")
  p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak in TFLOP/s; 0 = measure it")
  p.add_argument("--peak-n", type=int, default=0, help="matmul size for the measured peak (0: 2048 on CPU, 8192 else)")
  p.add_argument("--peak-calls", type=int, default=3, help="matmuls per timed peak unit")
  p.add_argument("--no-xla-count", action="store_true", help="skip the (unrolled) XLA cost analysis")
  p.set_defaults(repeats=6, budget_s=100.0, unrolled=False)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from nvlm_jax.training.flops import train_step_flops, trainable_towers_from_labels

  platform = jax.devices()[0].platform
  if not args.dtype:
    args.dtype = "float32" if platform == "cpu" else "bfloat16"
  if not args.peak_n:
    args.peak_n = 2048 if platform == "cpu" else 8192
  if args.dtype == "float32":
    common.setup_jax_fp32()
  common.enable_compilation_cache()
  machine = common.describe_machine()

  model = build_model(args)
  cfg = model.config
  params = common.random_init(model, seed=0)
  step, state, labels = common.our_train_step(model, params)
  tiles = common.SMALL["tiles_per_sample"]
  ids = common.multimodal_ids(
    args.batch,
    args.seq_len,
    tiles=tiles,
    tokens_per_tile=cfg.tokens_per_tile,
    vocab=args.vocab,
    image_token_id=cfg.image_token_id,
    seed=1,
  )
  pixels = common.random_tiles(args.batch, tiles, cfg.vision.image_size, seed=2)
  batch = {k: jnp.asarray(v) for k, v in common.training_batch(ids, pixels, cfg.image_token_id).items()}

  towers = trainable_towers_from_labels(labels, cfg)
  analytic = train_step_flops(
    cfg, batch_size=args.batch, seq_len=args.seq_len, num_tiles=args.batch * tiles, trainable_towers=towers
  )

  xla_flops = None
  if not args.no_xla_count:
    args.unrolled = True
    unrolled = build_model(args)
    args.unrolled = False
    u_step, u_state, _ = common.our_train_step(unrolled, common.random_init(unrolled))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (u_state, batch))
    cost = u_step.lower(*abstract).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0))

  holder = {"state": state}

  def train():
    holder["state"], m = step(holder["state"], batch)
    jax.block_until_ready(m["loss"])

  n = args.peak_n
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(args.dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(args.dtype)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))

  def peak():
    for _ in range(args.peak_calls):
      jax.block_until_ready(matmul(a, b))

  t0 = time.perf_counter()
  train()
  compile_s = time.perf_counter() - t0
  times = common.interleaved_timings(
    {"train_step": train, "matmul_peak": peak}, repeats=args.repeats, warmup=1, budget_s=args.budget_s
  )
  peak_flops = [args.peak_calls * 2.0 * n**3 / t for t in times["matmul_peak"]]
  if args.peak_tflops > 0:
    peak_flops = [args.peak_tflops * 1e12] * len(times["train_step"])
  step_s = times["train_step"]

  def mfu(flops):
    per_pair = [flops / s / pk for s, pk in zip(step_s, peak_flops)]
    return {
      "median_of_paired": statistics.median(per_pair),
      "of_medians": flops / statistics.median(step_s) / statistics.median(peak_flops),
      "min_paired": min(per_pair),
      "max_paired": max(per_pair),
    }

  result = {
    "benchmark": "mfu",
    "machine": machine,
    "setup": {
      "model": "NVLM-D (random weights)",
      "vision": common.SMALL["vision"],
      "tiles_per_sample": tiles,
      "llm": {
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
      },
      "batch": args.batch,
      "seq_len": args.seq_len,
      "dtype": args.dtype,
      "remat": args.remat,
      "attention_impl": args.attention_impl,
      "trainable": sorted(towers),
      "first_step_s_incl_compile": compile_s,
    },
    "flops_per_step": {
      "analytic": analytic,
      "xla_cost_analysis_unrolled": xla_flops,
      "xla_over_analytic": None if xla_flops is None else xla_flops / analytic["total"],
    },
    "train_step": common.stats(step_s),
    "peak": {
      "source": "--peak-tflops" if args.peak_tflops > 0 else f"measured: jitted {n}^3 {args.dtype} matmul",
      "median_flops_per_s": statistics.median(peak_flops),
      "max_flops_per_s": max(peak_flops),
    },
    "achieved_flops_per_s": {
      "analytic": analytic["total"] / statistics.median(step_s),
      "xla": None if xla_flops is None else xla_flops / statistics.median(step_s),
    },
    "mfu_analytic": mfu(analytic["total"]),
  }
  if xla_flops is not None:
    result["hfu_xla"] = mfu(xla_flops)
  common.emit(common.rounded(result), args.out)


if __name__ == "__main__":
  main()
