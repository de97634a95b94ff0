"""Dynamic high-resolution (DHR) tiling, bit-for-bit the NVLM / InternVL ``dynamic_preprocess`` (docs/paper.md (b)).

An image is stretched (aspect ratio NOT preserved) to the grid of ``image_size`` tiles whose aspect ratio
is closest to the image's, cut into row-major tiles, and, when the grid has more than one tile, followed by
a thumbnail of the whole original image. Each tile is then normalised exactly like torchvision's
``ToTensor()`` + ``Normalize(ImageNet mean/std)`` but kept channels-last (``[n, H, W, 3]``), the layout our
ViT patch embedding expects.

Exactness matters here: the grid choice breaks ties by the ORDER of the candidate ratios (a CPython set
iteration order in the reference) and by an exact float comparison, so the order is hard-coded below for the
NVLM setting (1..6 tiles) and every comparison is done with the same Python floats as the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Candidate grids (columns, rows) for min_tiles=1, max_tiles=6, in the reference's order: the CPython
# iteration order of the set comprehension, stable-sorted by area (docs/paper.md (b) step 2). Tie-breaking
# depends on it.
NVLM_TARGET_RATIOS: tuple[tuple[int, int], ...] = (
  (1, 1),
  (1, 2),
  (2, 1),
  (3, 1),
  (1, 3),
  (4, 1),
  (1, 4),
  (2, 2),
  (1, 5),
  (5, 1),
  (6, 1),
  (2, 3),
  (1, 6),
  (3, 2),
)

_BICUBIC = Image.Resampling.BICUBIC


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """Where the tiles of one image came from: ``cols x rows`` regular tiles (+ an optional thumbnail).

  Tile k < cols*rows is the crop ``tile_box(k)`` of the image resized to ``resized_size``; the thumbnail,
  when present, is always the last tile.
  """

  cols: int
  rows: int
  has_thumbnail: bool
  image_size: int

  @property
  def num_regular_tiles(self) -> int:
    return self.cols * self.rows

  @property
  def num_tiles(self) -> int:
    return self.num_regular_tiles + int(self.has_thumbnail)

  @property
  def resized_size(self) -> tuple[int, int]:
    """(width, height) of the stretched image the regular tiles are cut from."""
    return self.cols * self.image_size, self.rows * self.image_size

  def tile_position(self, k: int) -> tuple[int, int]:
    """(column, row), 0-based, of regular tile k (row-major order)."""
    if not 0 <= k < self.num_regular_tiles:
      raise IndexError(f"regular tile index {k} out of range for a {self.cols}x{self.rows} grid")
    return k % self.cols, k // self.cols

  def tile_box(self, k: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of regular tile k in the resized image."""
    col, row = self.tile_position(k)
    s = self.image_size
    return col * s, row * s, (col + 1) * s, (row + 1) * s


class TiledImage(NamedTuple):
  tiles: list[Image.Image]
  grid: TileGrid


def target_ratios(max_tiles: int = 6, min_tiles: int = 1) -> tuple[tuple[int, int], ...]:
  """Candidate (cols, rows) grids with min_tiles <= cols*rows <= max_tiles, in the reference's order.

  The NVLM setting (1, 6) returns the hard-coded :data:`NVLM_TARGET_RATIOS`. Other settings are rebuilt
  with the reference's own recipe (set comprehension, stable sort by area); CPython's iteration order of
  a set of small int tuples is deterministic (int hashes are not randomised), so this is reproducible.
  """
  if min_tiles < 1 or max_tiles < min_tiles:
    raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
  if (min_tiles, max_tiles) == (1, 6):
    return NVLM_TARGET_RATIOS
  return _generated_ratios(max_tiles, min_tiles)


@functools.lru_cache(maxsize=64)
def _generated_ratios(max_tiles: int, min_tiles: int) -> tuple[tuple[int, int], ...]:
  candidates = {
    (i, j)
    for n in range(min_tiles, max_tiles + 1)
    for i in range(1, n + 1)
    for j in range(1, n + 1)
    if min_tiles <= i * j <= max_tiles
  }
  return tuple(sorted(candidates, key=lambda r: r[0] * r[1]))


def find_closest_aspect_ratio(
  width: int, height: int, ratios: Sequence[tuple[int, int]], image_size: int
) -> tuple[int, int]:
  """The reference's choice: smallest |aspect - cols/rows|; on an exact float tie the later candidate
  wins iff the image area exceeds half the candidate grid's pixel area."""
  aspect = width / height
  area = width * height
  best_diff = float("inf")
  best = (1, 1)
  for cols, rows in ratios:
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best_diff = diff
      best = (cols, rows)
    elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
      best = (cols, rows)
  return best


def select_grid(
  width: int, height: int, *, max_tiles: int = 6, min_tiles: int = 1, image_size: int = 448
) -> tuple[int, int]:
  """(cols, rows) of the DHR grid for an image of ``width x height`` pixels."""
  if width <= 0 or height <= 0:
    raise ValueError(f"image size must be positive, got {width}x{height}")
  return find_closest_aspect_ratio(width, height, target_ratios(max_tiles, min_tiles), image_size)


def plan_grid(
  width: int,
  height: int,
  *,
  image_size: int = 448,
  max_tiles: int = 6,
  min_tiles: int = 1,
  use_thumbnail: bool = True,
  use_tiling: bool = True,
) -> TileGrid:
  """The :class:`TileGrid` that :func:`tile_image` will produce, from the image size alone (no pixels)."""
  if not use_tiling:
    return TileGrid(1, 1, False, image_size)
  cols, rows = select_grid(width, height, max_tiles=max_tiles, min_tiles=min_tiles, image_size=image_size)
  return TileGrid(cols, rows, use_thumbnail and cols * rows != 1, image_size)


def tile_image(
  image: Image.Image,
  *,
  image_size: int = 448,
  max_tiles: int = 6,
  min_tiles: int = 1,
  use_thumbnail: bool = True,
  use_tiling: bool = True,
) -> TiledImage:
  """Cut an RGB image into DHR tiles (row-major), plus the thumbnail when the grid has >1 tile.

  ``use_tiling=False`` is the pretraining setting: one ``image_size`` square resize, no thumbnail.
  Resizes are PIL bicubic (the default PIL resample for RGB that the reference relies on).
  """
  if image.mode != "RGB":
    raise ValueError(f"tile_image expects an RGB image (use image_io.load_image), got mode {image.mode}")
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  if not use_tiling:
    tile = image.resize((image_size, image_size), _BICUBIC)
    return TiledImage([tile], TileGrid(1, 1, False, image_size))

  grid = plan_grid(
    image.size[0],
    image.size[1],
    image_size=image_size,
    max_tiles=max_tiles,
    min_tiles=min_tiles,
    use_thumbnail=use_thumbnail,
    use_tiling=True,
  )
  resized = image.resize(grid.resized_size, _BICUBIC)
  tiles = [resized.crop(grid.tile_box(k)) for k in range(grid.num_regular_tiles)]
  if grid.has_thumbnail:
    tiles.append(image.resize((image_size, image_size), _BICUBIC))
  return TiledImage(tiles, grid)


def normalize(
  tiles: Sequence[Image.Image],
  *,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
  """``ToTensor()`` (/255) then ``Normalize(mean, std)`` in float32, channels-last: ``[n, H, W, 3]``."""
  if not tiles:
    raise ValueError("normalize: got no tiles")
  sizes = {t.size for t in tiles}
  if len(sizes) != 1:
    raise ValueError(f"normalize: tiles must share one size, got {sorted(sizes)}")
  pixels = np.stack([np.asarray(t.convert("RGB"), dtype=np.uint8) for t in tiles])
  # Every uint8 value of a channel maps to one float32: a [3, 256] table lookup is bit-identical to
  # the arithmetic and skips two full-size float passes (~1.5x faster at 448px x 7 tiles).
  levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
  table = (levels[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
  return table[np.arange(3), pixels]


def preprocess_image(
  image: Image.Image,
  *,
  image_size: int = 448,
  max_tiles: int = 6,
  min_tiles: int = 1,
  use_thumbnail: bool = True,
  use_tiling: bool = True,
) -> tuple[np.ndarray, TileGrid]:
  """tile_image + normalize: ``(float32 [num_tiles, image_size, image_size, 3], grid)``."""
  tiles, grid = tile_image(
    image,
    image_size=image_size,
    max_tiles=max_tiles,
    min_tiles=min_tiles,
    use_thumbnail=use_thumbnail,
    use_tiling=use_tiling,
  )
  return normalize(tiles), grid


def max_tiles_per_image(max_tiles: int, *, use_thumbnail: bool = True, use_tiling: bool = True) -> int:
  """Upper bound on the tiles one image can produce (e.g. 6 + thumbnail = 7 for NVLM)."""
  if not use_tiling:
    return 1
  return max_tiles + int(use_thumbnail and max_tiles > 1)


def pad_tiles(pixels: np.ndarray, max_tiles: int) -> tuple[np.ndarray, np.ndarray]:
  """Zero-pad ``[n, H, W, C]`` tiles to a static ``[max_tiles, H, W, C]`` plus a bool ``tile_mask``."""
  pixels = np.asarray(pixels)
  if pixels.ndim != 4:
    raise ValueError(f"pad_tiles: expected [num_tiles, H, W, C] pixels, got shape {pixels.shape}")
  n = pixels.shape[0]
  if n > max_tiles:
    raise ValueError(
      f"pad_tiles: {n} tiles do not fit in max_tiles={max_tiles}; lower max_tiles_per_image or raise max_tiles"
    )
  padded = np.zeros((max_tiles,) + pixels.shape[1:], dtype=np.float32)
  padded[:n] = pixels
  mask = np.zeros((max_tiles,), dtype=bool)
  mask[:n] = True
  return padded, mask
