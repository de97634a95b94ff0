"""NVLM-D vs NVLM-X vs NVLM-H training throughput at a scaled configuration, against the paper's Table 3.

    python bench/fusion_throughput.py [--scale 4] [--batch 1] [--every 6] [--variants d,x,h] [--repeats 4]
        [--causal-block-size N]

Paper (Table 3, 34B, SFT, ViT frozen, LLM unfrozen, 6 + 1 tiles of 256 tokens, 1,024 text tokens):
samples/s X 50.6, H 36.2, D 28.8 -> X/D = 1.76, H/D = 1.26. Decoder lengths: D 1,024 + 7 x 256 = 2,816;
X 1,024 (text only; every tile, thumbnail included, through cross-attention); H 1,024 + 256 = 1,280 (the
thumbnail in the decoder, the 6 regular tiles through cross-attention).

Scaled here (default --scale 4): every token count divided by 4, ratios kept:
  text 256 tokens (tile tags included), 6 + 1 tiles of 64 tokens (224 px tiles, patch 14: 16 x 16 patches
  + class token -> pixel shuffle 0.5 -> 8 x 8 = 64 tokens), so decoder lengths D 704, X 256, H 320;
  cross-attention key/value stream per tile: 8 tag slots + 64 image tokens.
Model (random weights), proportions of the 34B (ViT params ~ 0.16 x LLM params):
  ViT 4 layers x 256 (4 heads, MLP 1024, frozen: forward only), LLM 12 layers x 384 (6 heads / 2 KV heads,
  SwiGLU 1152, vocab 2048), gated cross-attention blocks one per 6 LLM layers (--every; the 34B's rate:
  10 blocks in 60 layers) -> 2 blocks, each before its group's last layer (the project default offset).
  Projectors as the paper: D and H the 2-layer mlp1 (1024 -> 1152 -> 384), X one layer (1024 -> 384).
Train step: nvlm_jax make_train_step (AdamW), projector + LLM (+ cross-attention blocks) trained.

Prints per-variant samples/s, X/D and H/D (median of paired per-repeat ratios, and of medians) next to the
paper's, the ordering, and the analytic model FLOPs per sample (nvlm_jax/training/flops.py), whose ratios
show what a FLOP-proportional implementation would give.
"""

from __future__ import annotations

import statistics
import time

import common

PAPER_SAMPLES_PER_S = {"x": 50.6, "h": 36.2, "d": 28.8}
TAG = 5  # tag tokens per tile in the synthetic stream (< max_tag_tokens = 8)


def configs(args):
  from nvlm_jax.config import CrossAttentionConfig, DecoderConfig, NVLMConfig, ProjectorConfig, VisionConfig

  grid = 2 * int(round((256 // args.scale) ** 0.5))  # patches per side: 64 tokens per tile at scale 4
  vision = VisionConfig(
    image_size=14 * grid,
    patch_size=14,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    intermediate_size=1024,
    norm_type="rms_norm",
    qk_normalization=True,
    qkv_bias=False,
    use_class_token=True,
  )
  llm = DecoderConfig(
    vocab_size=2048,
    hidden_size=384,
    num_layers=args.layers,
    num_heads=6,
    num_kv_heads=2,
    intermediate_size=1152,
    rope_theta=5e6,
    qkv_bias=False,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  if args.causal_block_size is not None:
    llm = llm.replace(causal_block_size=args.causal_block_size)
  image_token_id = llm.vocab_size - 1
  out = {}
  for variant in args.variants:
    extra = {}
    if variant in ("x", "h"):
      extra["cross_attention"] = CrossAttentionConfig(every=args.every, offset=args.every - 1, max_tag_tokens=8)
    projector = ProjectorConfig.for_variant(variant, vision, llm)
    out[variant] = NVLMConfig(
      variant=variant, vision=vision, projector=projector, llm=llm, image_token_id=image_token_id, max_tiles=6, **extra
    )
  return out


def stream(variant: str, *, batch: int, text_len: int, tiles: int, per_tile: int, image_token_id: int, seed: int):
  """int32 ids [batch, L]: text_len text tokens (tags and X/H anchors included) + the decoder's image tokens.

  D: every tile = tag + per_tile placeholders (L = text + tiles * per_tile).
  X: every tile = tag + 1 placeholder (its cross-attention anchor) (L = text).
  H: regular tiles as X, the last tile (thumbnail) = tag + per_tile placeholders (L = text + per_tile).
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  runs = {"d": [per_tile] * tiles, "x": [1] * tiles, "h": [1] * (tiles - 1) + [per_tile]}[variant]
  length = text_len + sum(r for r in runs if r > 1)
  ids = rng.integers(3, image_token_id, size=(batch, length)).astype(np.int32)
  pos = 8
  for run in runs:
    pos += TAG
    ids[:, pos : pos + run] = image_token_id
    pos += run
  assert pos < length, (variant, pos, length)
  return ids


def check_stream(variant: str, cfg, batch) -> None:
  """The model's own placeholder / tile-layout checks on the concrete ids (raise if they do not match)."""
  ids, tile_mask = batch["input_ids"], batch["tile_mask"]
  if variant == "d":
    from nvlm_jax.fusion.nvlm_d import check_image_placeholders

    check_image_placeholders(ids, tile_mask, image_token_id=cfg.image_token_id, tokens_per_tile=cfg.tokens_per_tile)
    return
  from nvlm_jax.fusion.cross_attention_inputs import check_tile_layout, tile_layout

  one = variant == "x"
  xc = cfg.cross_attention
  layout = tile_layout(
    ids,
    batch["segment_ids"],
    image_token_id=cfg.image_token_id,
    max_tiles=tile_mask.shape[1],
    one_tile_per_placeholder=one,
    max_tag_tokens=xc.max_tag_tokens,
  )
  check_tile_layout(
    layout,
    tile_mask,
    image_token_id=cfg.image_token_id,
    max_tiles=tile_mask.shape[1],
    tokens_per_tile=None if one else cfg.tokens_per_tile,
    max_tag_tokens=xc.max_tag_tokens,
  )


def paper_flops_ratios() -> dict:
  """X/D and H/D of the analytic model FLOPs per sample at the paper's own Table 3 setting (34B presets,
  decoder lengths 2,816 / 1,024 / 1,280, 7 tiles): what a FLOP-proportional implementation would measure."""
  from nvlm_jax.presets import get_preset
  from nvlm_jax.training.flops import train_step_flops

  seq = {"d": 2816, "x": 1024, "h": 1280}
  total = {}
  for v in ("d", "x", "h"):
    towers = {"projector", "language_model"} | ({"cross_attention"} if v != "d" else set())
    total[v] = train_step_flops(
      get_preset(f"nvlm_{v}_34b"), batch_size=1, seq_len=seq[v], num_tiles=7, tile_slots=7, trainable_towers=towers
    )["total"]
  return {
    "X/D": total["d"] / total["x"],
    "H/D": total["d"] / total["h"],
    "tflops_per_sample": {v.upper(): t / 1e12 for v, t in total.items()},
  }


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--scale", type=int, default=4, help="divide the paper's token counts by this (4, 16, ...)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--every", type=int, default=6, help="LLM layers per gated cross-attention block")
  p.add_argument("--variants", default="d,x,h")
  p.add_argument(
    "--causal-block-size",
    type=int,
    default=None,
    help="DecoderConfig.causal_block_size (default: the config's; 0 = full L x L attention)",
  )
  p.set_defaults(repeats=4, budget_s=80.0)
  args = p.parse_args()
  args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]

  import jax
  import jax.numpy as jnp

  from nvlm_jax.models import module_for_config
  from nvlm_jax.training.flops import train_step_flops, trainable_towers_from_labels

  common.setup_jax_fp32()
  common.enable_compilation_cache()
  machine = common.describe_machine()
  tiles, text_len = 7, 1024 // args.scale
  cfgs = configs(args)
  steps, setup = {}, {}
  for variant, cfg in cfgs.items():
    t0 = time.perf_counter()
    model = module_for_config(cfg)
    params = common.random_init(model, seed=0)
    per_tile = cfg.tokens_per_tile
    ids = stream(
      variant,
      batch=args.batch,
      text_len=text_len,
      tiles=tiles,
      per_tile=per_tile,
      image_token_id=cfg.image_token_id,
      seed=1,
    )
    pixels = common.random_tiles(args.batch, tiles, cfg.vision.image_size, seed=2)
    batch_np = common.training_batch(ids, pixels, cfg.image_token_id)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    check_stream(variant, cfg, batch)
    step, state, labels = common.our_train_step(model, params)
    flops = train_step_flops(
      cfg,
      batch_size=args.batch,
      seq_len=ids.shape[1],
      num_tiles=args.batch * tiles,
      tile_slots=tiles,
      trainable_towers=trainable_towers_from_labels(labels, cfg),
    )
    holder = {"state": state}

    def run(step=step, holder=holder, batch=batch):
      holder["state"], m = step(holder["state"], batch)
      jax.block_until_ready(m["loss"])

    run()  # compile
    steps[variant] = run
    setup[variant] = {
      "decoder_seq_len": int(ids.shape[1]),
      "tokens_per_tile": per_tile,
      "projector_layers": cfg.projector.num_layers,
      "cross_attention_blocks": cfg.cross_attention.num_blocks(cfg.llm.num_layers) if variant != "d" else 0,
      "analytic_flops_per_sample": flops["total"] / args.batch,
      "flops_by_tower_per_sample": {k: v / args.batch for k, v in flops.items() if k != "total"},
      "setup_and_compile_s": time.perf_counter() - t0,
    }

  times = common.interleaved_timings(steps, repeats=args.repeats, warmup=0, budget_s=args.budget_s)
  per_variant = {}
  for v in cfgs:
    s = common.stats(times[v])
    s["samples_per_s"] = args.batch / s["median_s"]
    s["achieved_flops_per_s"] = setup[v]["analytic_flops_per_sample"] * args.batch / s["median_s"]
    per_variant[v] = s
  ratios = {}
  paper_flops = paper_flops_ratios()
  for v in ("x", "h"):
    if v in cfgs and "d" in cfgs:
      paired = [d / o for d, o in zip(times["d"], times[v])]
      measured = statistics.median(paired)
      paper = PAPER_SAMPLES_PER_S[v] / PAPER_SAMPLES_PER_S["d"]
      ratios[f"{v.upper()}/D"] = {
        "measured_median_of_paired": measured,
        "measured_of_medians": statistics.median(times["d"]) / statistics.median(times[v]),
        "paper": paper,
        "measured_over_paper": measured / paper,
        "within_25pct_of_paper": abs(measured / paper - 1) <= 0.25,
        "analytic_flops_ratio": setup["d"]["analytic_flops_per_sample"] / setup[v]["analytic_flops_per_sample"],
        "paper_setting_analytic_flops_ratio": paper_flops[f"{v.upper()}/D"],
        # the paper's measured ratio over its own FLOPs ratio: its X/H ran at this fraction of D's FLOP/s
        "paper_efficiency_vs_D": paper / paper_flops[f"{v.upper()}/D"],
      }
  order = sorted(cfgs, key=lambda v: -per_variant[v]["samples_per_s"])
  result = {
    "benchmark": "fusion_throughput",
    "machine": machine,
    "setup": {
      "scale": f"paper token counts / {args.scale}",
      "text_tokens": text_len,
      "tiles": "6 + 1 thumbnail",
      "batch": args.batch,
      "dtype": "float32",
      "vision": {
        "image_size": next(iter(cfgs.values())).vision.image_size,
        "patch": 14,
        "hidden": 256,
        "layers": 4,
        "frozen": True,
      },
      "llm": {
        "hidden": 384,
        "layers": args.layers,
        "heads": 6,
        "kv_heads": 2,
        "intermediate": 1152,
        "vocab": 2048,
        "trainable": True,
      },
      "cross_attention": {"every": args.every, "offset": args.every - 1, "max_tag_tokens": 8},
      "variants": setup,
    },
    "train_step": per_variant,
    "ratios_vs_D": ratios,
    "paper_setting_analytic_tflops_per_sample": paper_flops["tflops_per_sample"],
    "ordering_fastest_first": [v.upper() for v in order],
    "paper_ordering": ["X", "H", "D"],
    "ordering_matches_paper": [v.upper() for v in order] == [v for v in ["X", "H", "D"] if v.lower() in cfgs],
  }
  common.emit(common.rounded(result), args.out)


if __name__ == "__main__":
  main()
