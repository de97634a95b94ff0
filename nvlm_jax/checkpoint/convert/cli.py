"""`python -m nvlm_jax.convert`: checkpoints in and out of nvlm_jax.

    import   --hf-dir DIR --out DIR [--dtype auto|bfloat16|float32] [--mesh fsdp=4,tensor=2] [--layout auto]
             Hugging Face safetensors -> our orbax checkpoint, one tensor at a time.
    export   --checkpoint DIR --out DIR --layout nvlm_d|internvl|qwen2|llama [--max-shard-size 5GB]
             [--pad-dummy-heads] [--dtype auto|bfloat16|float32]
             our checkpoint -> sharded safetensors + config.json (+ tokenizer files), for PyTorch / vLLM.
    inspect  PATH [--all] [--json]
             keys, shapes, dtypes of either kind of checkpoint, and the HF <-> param mapping.
    verify   --hf-dir DIR --checkpoint DIR [--seq-len 64] [--tiles 2] [--atol 1e-3]
             a forward of our checkpoint vs the HF files (our importer, and transformers where it can).
    stitch   --vision DIR --llm DIR --variant d|x|h --out DIR
             a new NVLM model from an InternViT and an LLM checkpoint, with fresh new modules.

Outputs are written beside the target under a temporary name and renamed when complete; a target that
exists is refused. Errors name the file and key and exit with status 1 (2 for usage errors).
Details, layouts and memory figures: docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _add_import(sub) -> None:
  p = sub.add_parser("import", help="Hugging Face safetensors -> our orbax checkpoint")
  p.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
  p.add_argument("--out", required=True, help="new checkpoint directory (must not exist)")
  p.add_argument(
    "--dtype",
    default="auto",
    choices=("auto", "bfloat16", "float32", "float16"),
    help="storage dtype; auto = the checkpoint's own floating dtype",
  )
  p.add_argument("--mesh", default=None, help="mesh to chunk for, e.g. fsdp=4,tensor=2 (axes data, fsdp, tensor)")
  p.add_argument(
    "--layout",
    default="auto",
    help="auto, qwen2, llama, internvl, nvlm_d, intern_vit, internvl_vision or a registered layout name",
  )
  p.add_argument(
    "--no-scan-layers",
    dest="scan_layers",
    action="store_false",
    help="one param per layer instead of stacked [layers, ...] params",
  )
  p.add_argument("--compression", default="zstd", choices=("zstd", "none"))
  p.add_argument(
    "--memory-budget",
    default="128MiB",
    help="bytes of tensors in flight (being converted or written) besides the current one",
  )
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_export(sub) -> None:
  p = sub.add_parser("export", help="our checkpoint -> sharded safetensors + config.json")
  p.add_argument("--checkpoint", required=True, help="workdir, its checkpoints/ dir, or one step dir")
  p.add_argument("--out", required=True, help="new HF directory (must not exist)")
  p.add_argument("--layout", required=True, choices=("nvlm_d", "internvl", "qwen2", "llama"))
  p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
  p.add_argument(
    "--pad-dummy-heads",
    action="store_true",
    help="nvlm_d: store the ViT heads padded with zero heads to a multiple of 8, as NVLM-D-72B and "
    "vLLM's NVLM-D loader have them (25 -> 32)",
  )
  p.add_argument(
    "--dtype",
    default="auto",
    choices=("auto", "bfloat16", "float32", "float16"),
    help="dtype of the written tensors; auto = as stored",
  )
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--quiet", action="store_true")


def _add_inspect(sub) -> None:
  p = sub.add_parser("inspect", help="keys, shapes, dtypes and the HF <-> param mapping")
  p.add_argument("path")
  p.add_argument("--layout", default="auto")
  p.add_argument("--all", action="store_true", help="list every per-layer key instead of folding them")
  p.add_argument("--json", action="store_true", help="machine-readable report")


def _add_verify(sub) -> None:
  p = sub.add_parser("verify", help="forward of our checkpoint vs the HF files")
  p.add_argument("--hf-dir", required=True)
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--layout", default="auto")
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--tiles", type=int, default=2, help="image tiles in the NVLM test input (0: text only)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--atol", type=float, default=1e-3, help="largest accepted logit difference")
  p.add_argument("--no-transformers", dest="use_transformers", action="store_false")


def _add_stitch(sub) -> None:
  p = sub.add_parser("stitch", help="new NVLM model from an InternViT and an LLM checkpoint")
  p.add_argument("--vision", required=True, help="InternViT: HF dir, our checkpoint, or an NVLM checkpoint")
  p.add_argument("--llm", required=True, help="LLM: HF Qwen2/Llama dir, our checkpoint, or an NVLM checkpoint")
  p.add_argument("--variant", required=True, choices=("d", "x", "h"))
  p.add_argument("--out", required=True)
  p.add_argument(
    "--dtype",
    default="auto",
    choices=("auto", "bfloat16", "float32", "float16"),
    help="storage dtype; auto = the LLM's",
  )
  p.add_argument(
    "--image-token-id",
    type=int,
    default=None,
    help="placeholder id (default: <|vision_pad|> from the LLM's tokenizer files, else vocab_size)",
  )
  p.add_argument(
    "--xattn-every",
    type=int,
    default=None,
    help="x/h: LLM layers per gated cross-attention block (default: num_layers / 10, the paper's 10)",
  )
  p.add_argument(
    "--xattn-offset",
    type=int,
    default=None,
    help="x/h: block g runs before LLM layer g * every + offset (default: every - 1)",
  )
  p.add_argument("--mesh", default=None)
  p.add_argument("--seed", type=int, default=0, help="PRNG seed of the fresh modules")
  p.add_argument("--compression", default="zstd", choices=("zstd", "none"))
  p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m nvlm_jax.convert",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for add in (_add_import, _add_export, _add_inspect, _add_verify, _add_stitch):
    add(sub)
  return parser


def run(args: argparse.Namespace) -> int:
  if args.command == "import":
    from nvlm_jax.checkpoint.convert.importer import import_checkpoint  # lazy: the chosen command's code only
    from nvlm_jax.checkpoint.convert.output import parse_size  # lazy: the chosen command's code only

    summary = import_checkpoint(
      args.hf_dir,
      args.out,
      dtype=args.dtype,
      mesh=args.mesh,
      layout=args.layout,
      scan_layers=args.scan_layers,
      compression=args.compression,
      progress=not args.quiet,
      inflight_bytes=parse_size(args.memory_budget),
    )
    print(json.dumps(summary, indent=2))
  elif args.command == "export":
    from nvlm_jax.checkpoint.convert.export import export_checkpoint  # lazy: the chosen command's code only

    summary = export_checkpoint(
      args.checkpoint,
      args.out,
      layout=args.layout,
      max_shard_size=args.max_shard_size,
      pad_dummy_heads=args.pad_dummy_heads,
      dtype=args.dtype,
      step=args.step,
      progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2))
  elif args.command == "inspect":
    from nvlm_jax.checkpoint.convert.inspect import format_report, inspect_path  # lazy: the chosen command's code only

    report = inspect_path(args.path, layout=args.layout)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report, show_all=args.all))
  elif args.command == "verify":
    from nvlm_jax.checkpoint.convert.verify import verify  # lazy: the chosen command's code only

    report = verify(
      args.hf_dir,
      args.checkpoint,
      seq_len=args.seq_len,
      tiles=args.tiles,
      seed=args.seed,
      atol=args.atol,
      layout=args.layout,
      use_transformers=args.use_transformers,
    )
    for key in ("param_max_abs_diff", "vs_importer_max_abs_diff", "vs_transformers_max_abs_diff", "vs_transformers"):
      if key in report:
        print(f"{key}: {report[key]}")
    print(json.dumps(report, indent=2))
    if not report["ok"]:
      print(f"error: a logit difference exceeds --atol {args.atol}", file=sys.stderr)
      return 1
  elif args.command == "stitch":
    from nvlm_jax.checkpoint.convert.stitch import stitch_checkpoint  # lazy: the chosen command's code only

    summary = stitch_checkpoint(
      args.vision,
      args.llm,
      args.out,
      variant=args.variant,
      dtype=args.dtype,
      image_token_id=args.image_token_id,
      xattn_every=args.xattn_every,
      xattn_offset=args.xattn_offset,
      mesh=args.mesh,
      seed=args.seed,
      compression=args.compression,
      progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2))
  return 0


def limit_malloc_arenas(count: int = 2) -> None:
  """glibc gives every thread that allocates its own malloc arena and keeps freed memory there; with
  TensorStore's encoder threads that retains hundreds of MB of freed chunk buffers. Two arenas keep
  the peak RSS at what is actually in use. No-op off glibc."""
  try:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-8, count)  # M_ARENA_MAX
  except (OSError, AttributeError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command in ("import", "export", "stitch"):
    limit_malloc_arenas()
  from nvlm_jax.checkpoint.convert.output import ConvertError  # the error types; --help stays free of jax
  from nvlm_jax.checkpoint.safetensors_io import CheckpointError  # see above
  from nvlm_jax.checkpoint.text_layouts import ConfigError  # see above

  try:
    return run(args)
  except (ConvertError, CheckpointError, ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
