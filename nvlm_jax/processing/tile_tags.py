"""Tile tags: the plain-text markers placed before each tile's image tokens (paper Table 1, docs/paper.md (e)).

NVLM's finding is that telling the decoder which tile it is looking at (a text tag before each tile's
embeddings) helps OCR-heavy tasks; the released model uses 1-D tags. All formats here produce one tag
string per tile of an image (thumbnail last), and the whole image is wrapped in ``<Image>`` ... ``</Image>``.
Tags are ordinary text (tokenized by the BPE, ~5 tokens each with the Qwen2 tokenizer), never special tokens.

Formats (``TILE_TAG_FORMATS``):

* ``"none"``: empty tags (the pretraining setting and the plain InternVL layout).
* ``"1d"``: ``<tile_1>`` ... ``<tile_{n-1}>`` then the global tag for the LAST tile. This is the reference
  rule verbatim (``tags[:n-1] + [global]``), so the global tag goes to the thumbnail when there is one, to
  the single tile of a 1x1 grid, and, if thumbnails are switched off for a multi-tile grid, to the last
  regular tile (faithful to the reference, even if odd).
* ``"2d_grid"``: ``<tile_x{c}_y{r}>`` with the 1-based column c and row r of each regular tile.
* ``"2d_bbox"``: ``<box> (x0, y0), (x1, y1) </box>`` with the tile's pixel box in the coordinates of the
  stretched image the tiles were cut from (``TileGrid.resized_size``, e.g. a 3x2 grid at 448 px spans
  1344x896 and tile 5 is ``<box> (448, 448), (896, 896) </box>``). Integer pixels rather than normalised
  coordinates: exact, short to tokenize, and they carry the tile scale (the paper gives no unit).

For both 2-D formats the thumbnail keeps the global tag, and a 1x1 grid (no thumbnail: the single tile IS the
global view) also gets the global tag, as in the 1-D format.

``global_tag`` is ``<tile_global_thumbnail>`` for the Qwen2-72B model; the Yi-34B ablations used
``<tile_global>`` (:data:`YI_GLOBAL_TILE_TAG`).
"""

from __future__ import annotations

from typing import Sequence

from nvlm_jax.vision.tiling import TileGrid

TILE_TAG_FORMATS = ("none", "1d", "2d_grid", "2d_bbox")
DEFAULT_GLOBAL_TILE_TAG = "<tile_global_thumbnail>"
YI_GLOBAL_TILE_TAG = "<tile_global>"
IMAGE_START = "<Image>"
IMAGE_END = "</Image>"


def check_tile_tag_format(tile_tag_format: str) -> str:
  if tile_tag_format not in TILE_TAG_FORMATS:
    raise ValueError(f"unknown tile_tag_format {tile_tag_format!r}; expected one of {TILE_TAG_FORMATS}")
  return tile_tag_format


def tile_tags(
  grid: TileGrid,
  tile_tag_format: str = "1d",
  *,
  global_tag: str = DEFAULT_GLOBAL_TILE_TAG,
) -> list[str]:
  """One tag string per tile of ``grid`` (regular tiles row-major, thumbnail last); ``""`` for "none"."""
  check_tile_tag_format(tile_tag_format)
  n = grid.num_tiles
  if tile_tag_format == "none":
    return [""] * n
  if tile_tag_format == "1d":
    return [f"<tile_{k}>" for k in range(1, n)] + [global_tag]
  if grid.num_regular_tiles == 1:
    # 1x1 grid: the only tile is the whole image (thumbnails are never added to 1x1 grids).
    return [global_tag] * n
  tags = []
  for k in range(grid.num_regular_tiles):
    if tile_tag_format == "2d_grid":
      col, row = grid.tile_position(k)
      tags.append(f"<tile_x{col + 1}_y{row + 1}>")
    else:
      x0, y0, x1, y1 = grid.tile_box(k)
      tags.append(f"<box> ({x0}, {y0}), ({x1}, {y1}) </box>")
  if grid.has_thumbnail:
    tags.append(global_tag)
  return tags


def expand_image_text(
  tags: Sequence[str],
  *,
  context_token: str,
  tokens_per_tile: int,
  image_start: str = IMAGE_START,
  image_end: str = IMAGE_END,
) -> str:
  """NVLM-D text for one image: ``image_start + "".join(tag + context_token*tokens_per_tile) + image_end``.

  ``tokens_per_tile=0`` gives the tags-only text (what NVLM-X places in the decoder stream).
  """
  if tokens_per_tile < 0:
    raise ValueError(f"tokens_per_tile must be >= 0, got {tokens_per_tile}")
  body = "".join(tag + context_token * tokens_per_tile for tag in tags)
  return f"{image_start}{body}{image_end}"
