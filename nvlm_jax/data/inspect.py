"""Look at training samples exactly as the model will see them.

    python -m nvlm_jax.data.inspect --synthetic 100 [--size tiny|paper] [--num 3] [--save-tiles tiles.png]
    python -m nvlm_jax.data.inspect --llava train.jsonl --image-root images/ --tokenizer ckpt_dir/
    python -m nvlm_jax.data.inspect --array-record data/ [--split train] [--dataset-name NAME] --batch

For each sample: the tile grid of every image (with the tag before each tile), token counts (positions,
loss tokens, image placeholder tokens), and the decoded text with runs of image placeholders compressed
(``<|vision_pad|>x256``) and the loss-masked targets in ``[[...]]``. Skipped samples show their reason.
``--save-tiles`` writes the tiles of the shown samples as one PNG: per image, the regular tiles in their
grid and the thumbnail to the right. ``--batch`` also packs the shown samples' pipeline into one batch and
prints the row layout. ``--tokenizer`` takes what ``config.data.tokenizer`` takes (a training workdir, a directory
with tokenizer.json, ``tiny_synthetic``); without it the tiny demo tokenizer is trained on the synthetic corpus.

Samples pass through the same map step as training (nvlm_jax/data/encode.py), so tile degradation and every
skip reason apply; only shuffling is off, so sample k is record k of the source.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from nvlm_jax.data.encode import EncodeRecord
from nvlm_jax.data.llava import LlavaSource
from nvlm_jax.data.packing import PackedBatchIterator
from nvlm_jax.data.processor_setup import PROCESSOR_FILE, TINY_TOKENIZER, build_tokenizer, read_run_processor
from nvlm_jax.data.synthetic import SyntheticSource
from nvlm_jax.processing.processor import Processor
from nvlm_jax.processing.tile_tags import tile_tags
from nvlm_jax.vision.tiling import TileGrid

GAP = 4  # pixels between tiles in --save-tiles


# ---- building the processor and source ------------------------------------------------------------------
def build_processor(args):
  tiny = args.size == "tiny" and args.synthetic
  image_size = args.image_size or (56 if tiny else 448)
  patch_size = args.patch_size or (7 if tiny else 14)
  settings = dict(image_size=image_size, patch_size=patch_size, max_tiles_per_image=args.max_tiles_per_image)
  if args.tokenizer:  # the values config.data.tokenizer takes (processor_setup.build_tokenizer)
    directory = Path(args.tokenizer)
    keep_settings = not (args.image_size or args.patch_size)
    if (directory / PROCESSOR_FILE).is_file() and keep_settings:  # a training workdir: the processor it used
      return read_run_processor(directory)
    if (directory / "config.json").is_file() and keep_settings:
      return Processor.from_pretrained(directory, max_tiles_per_image=args.max_tiles_per_image)
    return Processor(build_tokenizer(args.tokenizer, max_tiles=args.max_tiles_per_image), **settings)
  return Processor(build_tokenizer(TINY_TOKENIZER, max_tiles=args.max_tiles_per_image), **settings)


def build_source(args, processor):
  if args.synthetic:
    return SyntheticSource(
      args.synthetic, args.seed, size=args.size, tile_size=processor.image_size, max_tiles=processor.max_tiles_per_image
    )
  if args.llava:
    return LlavaSource(args.llava, args.image_root)
  from nvlm_jax.data.tfds_builder import ArrayRecordSource  # tensorflow_datasets loads only for ArrayRecord sources

  return ArrayRecordSource(args.array_record, args.split, dataset_name=args.dataset_name)


# ---- text rendering ---------------------------------------------------------------------------------------
def highlighted_text(example: dict, tokenizer, placeholder: str) -> str:
  """The sample's tokens decoded, loss targets in [[...]], placeholder runs compressed to ``tokxN``."""
  ids = np.concatenate([example["input_ids"], example["targets"][-1:]])
  is_target = np.concatenate([[0.0], example["loss_mask"]]) > 0
  pieces, start = [], 0
  for j in range(1, len(ids) + 1):
    if j == len(ids) or is_target[j] != is_target[start]:
      text = tokenizer.decode(ids[start:j].tolist())
      pieces.append(f"[[{text}]]" if is_target[start] else text)
      start = j
  text = "".join(pieces)
  pattern = re.compile(f"(?:{re.escape(placeholder)})+")
  return pattern.sub(lambda m: f"{placeholder}x{len(m.group(0)) // len(placeholder)}", text)


def grid_lines(grid: TileGrid, tags: list[str]) -> list[str]:
  width = max(len(t) for t in tags[: grid.num_regular_tiles])
  lines = []
  for row in range(grid.rows):
    cells = [f"[{tags[row * grid.cols + col]:<{width}}]" for col in range(grid.cols)]
    lines.append("    " + "".join(cells))
  if grid.has_thumbnail:
    lines[0] += f"   + thumbnail [{tags[-1]}]"
  return lines


def describe(k: int, example: dict, processor) -> str:
  head = f"=== sample {k}: id={example['id']} source={example['source']} ==="
  if example["skip"]:
    return f"{head}\nSKIPPED ({example['skip']}): {example.get('detail', '')}\n"
  out = [head]
  grids = [TileGrid(c, r, bool(t), processor.image_size) for c, r, t in example["grids"]]
  n_tiles = example["pixel_values"].shape[0]
  cap = f"tile cap {example['tile_cap']}" + (" (DEGRADED to fit)" if example["degraded"] else "")
  out.append(f"images: {len(grids)}, tiles: {n_tiles} ({processor.image_size}px), {cap}")
  for i, grid in enumerate(grids):
    tags = tile_tags(grid, processor.tile_tag_format, global_tag=processor.global_tile_tag)
    tags = [t or "-" for t in tags]
    thumb = " + thumbnail" if grid.has_thumbnail else ""
    out.append(f"  image {i + 1}: grid {grid.cols}x{grid.rows}{thumb} -> {grid.num_tiles} tiles")
    out.extend(grid_lines(grid, tags))
  ids = example["input_ids"]
  n_image = int(np.sum(np.concatenate([ids, example["targets"][-1:]]) == processor.image_context_id))
  n_loss = int(example["loss_mask"].sum())
  out.append(
    f"tokens: {len(ids) + 1} ({len(ids)} input positions after the shift), loss tokens: {n_loss}, "
    f"image placeholders: {n_image} ({n_tiles} tiles x {processor.tokens_per_tile}), "
    f"other: {len(ids) + 1 - n_image}"
  )
  out.append("text (loss targets in [[...]]):")
  out.append(highlighted_text(example, processor.tokenizer, processor.image_context_token))
  return "\n".join(out) + "\n"


# ---- tiles as one image ---------------------------------------------------------------------------------
def tiles_to_uint8(pixels: np.ndarray, processor) -> np.ndarray:
  """Undo the normalisation: float [n, S, S, 3] -> uint8."""
  mean, std = np.asarray(processor.image_mean, np.float32), np.asarray(processor.image_std, np.float32)
  return np.clip(np.rint((pixels * std + mean) * 255.0), 0, 255).astype(np.uint8)


def tile_sheet(examples: Sequence[dict], processor) -> Image.Image | None:
  """Every image of the given examples: regular tiles in their grid, the thumbnail to the right."""
  size = processor.image_size
  blocks = []  # (grid, uint8 tiles) per image
  for example in examples:
    if example["skip"] or not example["grids"]:
      continue
    tiles = tiles_to_uint8(example["pixel_values"], processor)
    offset = 0
    for c, r, thumb in example["grids"]:
      n = c * r + int(thumb)
      blocks.append((TileGrid(c, r, bool(thumb), size), tiles[offset : offset + n]))
      offset += n
  if not blocks:
    return None
  step = size + GAP
  width = (
    max((g.cols + (1 if g.has_thumbnail else 0)) * step + (2 * GAP if g.has_thumbnail else 0) for g, _ in blocks) + GAP
  )
  height = sum(g.rows * step + 2 * GAP for g, _ in blocks) + GAP
  sheet = Image.new("RGB", (width, height), (40, 40, 40))
  draw = ImageDraw.Draw(sheet)
  y = GAP
  for grid, tiles in blocks:
    for k in range(grid.num_regular_tiles):
      col, row = grid.tile_position(k)
      sheet.paste(Image.fromarray(tiles[k]), (GAP + col * step, y + row * step))
    if grid.has_thumbnail:
      x = GAP + grid.cols * step + 2 * GAP
      sheet.paste(Image.fromarray(tiles[-1]), (x, y))
      draw.rectangle((x - 2, y - 2, x + size + 1, y + size + 1), outline=(255, 200, 0))
    y += grid.rows * step + 2 * GAP
  return sheet


# ---- packed batch layout --------------------------------------------------------------------------------
def batch_layout(batch: dict) -> str:
  lines = []
  for r in range(batch["segment_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    lengths = [int((seg == k).sum()) for k in range(1, int(seg.max()) + 1)]
    tiles = int(batch["tile_mask"][r].sum()) if "tile_mask" in batch else 0
    ids = batch["sample_ids"][r] if "sample_ids" in batch else []
    lines.append(
      f"  row {r}: {len(lengths)} samples, tokens {lengths} + {len(seg) - sum(lengths)} padding, "
      f"{tiles} tiles, loss tokens {int(batch['loss_mask'][r].sum())}  {ids}"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m nvlm_jax.data.inspect", description=__doc__.split("\n")[0])
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--synthetic", type=int, metavar="N", help="the built-in synthetic set with N samples")
  what.add_argument("--llava", metavar="FILE", help="a LLaVA-style .json / .jsonl file")
  what.add_argument("--array-record", metavar="DIR", help="a dataset converted by nvlm_jax.data.tfds_builder")
  parser.add_argument("--image-root", default=None, help="LLaVA image directory (default: the file's directory)")
  parser.add_argument("--split", default="train", help="--array-record split")
  parser.add_argument(
    "--dataset-name", default=None, help="--array-record: the --name it was converted with (data config: dataset_name)"
  )
  parser.add_argument("--size", default="tiny", choices=("tiny", "paper"), help="synthetic size preset")
  parser.add_argument("--seed", type=int, default=0, help="synthetic seed")
  parser.add_argument(
    "--tokenizer",
    default=None,
    help="as config.data.tokenizer: a training workdir (its tokenizer and processor settings), a checkpoint dir "
    "with tokenizer.json (+ config.json for image settings), or 'tiny_synthetic' (the default)",
  )
  parser.add_argument("--image-size", type=int, default=0, help="tile size (default 56 for tiny synthetic, else 448)")
  parser.add_argument("--patch-size", type=int, default=0, help="ViT patch (default 7 for tiny synthetic, else 14)")
  parser.add_argument("--max-tiles-per-image", type=int, default=6)
  parser.add_argument("--seq-len", type=int, default=0, help="decoder length (default 256 tiny, 3200 otherwise)")
  parser.add_argument("--max-tiles", type=int, default=-1, help="tile slots per row (default: the processor's)")
  parser.add_argument("--start", type=int, default=0, help="first record index")
  parser.add_argument("--num", type=int, default=3, help="how many records to show")
  parser.add_argument("--save-tiles", metavar="OUT.png", default=None, help="write the tiles of the shown samples")
  parser.add_argument("--batch", action="store_true", help="also pack the shown samples and print the row layout")
  parser.add_argument("--batch-size", type=int, default=4)
  args = parser.parse_args(None if argv is None else list(argv))

  processor = build_processor(args)
  source = build_source(args, processor)
  tiny = args.size == "tiny" and args.synthetic
  seq_len = args.seq_len or (256 if tiny else 3200)
  max_tiles = processor.max_tiles_per_sample if args.max_tiles < 0 else args.max_tiles
  encoder = EncodeRecord(processor, seq_len=seq_len, max_tiles=max_tiles, keep_text=True)
  print(
    f"source: {source!r} ({len(source)} records); tiles {processor.image_size}px, "
    f"{processor.tokens_per_tile} tokens per tile, seq_len {seq_len}, {max_tiles} tile slots per row"
  )
  stop = min(len(source), args.start + args.num)
  examples = [encoder(source[i]) for i in range(args.start, stop)]
  for k, example in zip(range(args.start, stop), examples):
    print(describe(k, example, processor))

  if args.save_tiles:
    sheet = tile_sheet(examples, processor)
    if sheet is None:
      print(f"no tiles to save (no shown sample has images); {args.save_tiles} not written")
    else:
      sheet.save(args.save_tiles)
      print(
        f"wrote the tiles of {sum(bool(e['grids']) for e in examples if not e['skip'])} sample(s) to "
        f"{args.save_tiles} ({sheet.size[0]}x{sheet.size[1]})"
      )

  if args.batch:
    import grain

    kept = grain.MapDataset.source(examples).to_iter_dataset()
    packer = PackedBatchIterator(
      iter(kept),
      batch_size=args.batch_size,
      seq_len=seq_len,
      max_tiles=max_tiles,
      tile_size=processor.image_size,
      pad_id=processor.tokenizer.pad_id,
      source_names=[getattr(source, "name", "source")],
      include_sample_ids=True,
    )
    batch = next(packer)
    print(f"first packed batch ({args.batch_size} rows x {seq_len} tokens, {max_tiles} tile slots):")
    print(batch_layout(batch))
    packer.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
