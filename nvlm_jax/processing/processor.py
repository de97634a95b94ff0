"""Processor: chat messages + images -> model-ready numpy arrays (``input_ids``, ``attention_mask``, ``labels``,
``pixel_values``, ``tile_mask``), the NVLM-D way.

Per sample:
  1. Messages are validated; every ``<image>`` mark in system/user content stands for the next image.
  2. Each image is decoded (:func:`load_image`) and DHR-tiled (:mod:`nvlm_jax.vision.tiling`); if all tiles of
     the sample would not fit the static ``max_tiles_per_sample`` slots, the per-image tile cap is lowered
     (Megatron's multi-image rule ``max(1, max_tiles // num_images)`` first, then one step at a time).
  3. The k-th ``<image>`` mark is replaced by :meth:`Processor.expand_image` of the k-th image (NVLM-D:
     ``<Image>`` + per tile ``tag + <|vision_pad|> * tokens_per_tile`` + ``</Image>``).
  4. The chat template renders the conversation; the WHOLE string is tokenized at once (as the HF model's
     ``chat()`` does), and tokens whose first character lies in an assistant target span get labels.

Tiles are laid out image 1 then image 2 ... in ``pixel_values``; the model scatters tile t's embeddings into
the t-th group of ``tokens_per_tile`` image-context tokens of the row (with tile tags, each group is a
separate run of placeholders; with ``tile_tag_format="none"`` the groups are contiguous).

Fusion variants: the text form of an image is the only thing that differs between NVLM-D/X/H on this side,
and it lives in one method per variant, ``_expand_image_<fusion>(grid, tags)``. Every tile is written as its
tag followed by a group of image-context placeholders; only the group sizes differ:

* ``"d"``: ``tokens_per_tile`` per tile (the decoder receives every tile's image tokens);
* ``"x"``: ONE per tile (the tile's anchor; the tile itself is read through cross-attention);
* ``"h"``: ``tokens_per_tile`` for the global view (the thumbnail, or the single tile of a 1x1 grid), one for
  every regular tile. H needs non-empty tile tags, which keep the groups apart.

The inputs are the same arrays for all three (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``,
``tile_mask``): X and H read where the tiles and tags are from the ids (nvlm_jax/fusion/cross_attention_inputs.py),
which is what lets them use the training batch and ``nvlm_jax.generate`` unchanged. For X and H the image text is
tokenized piece by piece (``<Image>``, each tag, the placeholders, ``</Image>``, as Megatron inserts tag token ids),
so ``<Image>`` always has the ids of :attr:`Processor.image_start_token_ids`, which the model config must carry
(``NVLMConfig.image_start_token_ids``; :meth:`Processor.model_token_ids`). NVLM-D tokenizes the whole string at
once, as the HF model's ``chat()`` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from nvlm_jax.processing import chat_template as ct
from nvlm_jax.processing.tile_tags import (
  DEFAULT_GLOBAL_TILE_TAG,
  IMAGE_END,
  IMAGE_START,
  check_tile_tag_format,
  expand_image_text,
  tile_tags,
)
from nvlm_jax.processing.tokenizer import IMG_CONTEXT, VISION_PAD, NvlmTokenizer
from nvlm_jax.vision.image_io import DEFAULT_MAX_PIXELS, ImageError, load_image
from nvlm_jax.vision.tiling import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  TileGrid,
  max_tiles_per_image as tile_upper_bound,
  normalize,
  plan_grid,
  tile_image,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FUSIONS = ("d", "x", "h")
INTERNVL_IMAGE_START, INTERNVL_IMAGE_END = "<img>", "</img>"


class SampleTooLongError(ValueError):
  """A sample needs more tokens (or tile slots) than allowed. The data pipeline catches this and retries
  the sample with a smaller ``max_tiles_per_image``."""

  reason = "too_long"

  def __init__(
    self,
    length: int,
    limit: int,
    *,
    what: str = "tokens",
    sample_index: int | None = None,
    num_tiles: int | None = None,
  ):
    self.length, self.limit, self.what = length, limit, what
    self.sample_index, self.num_tiles = sample_index, num_tiles
    where = "sample" if sample_index is None else f"sample {sample_index}"
    tiles = "" if num_tiles is None else f" (with {num_tiles} image tiles)"
    super().__init__(f"{where} needs {length} {what}{tiles}, more than the limit of {limit}")

  def __reduce__(self):
    return _rebuild_too_long, (self.length, self.limit, self.what, self.sample_index, self.num_tiles)


def _rebuild_too_long(length, limit, what, sample_index, num_tiles):
  return SampleTooLongError(length, limit, what=what, sample_index=sample_index, num_tiles=num_tiles)


class ImageCountMismatchError(ValueError):
  """The number of ``<image>`` marks in a conversation differs from the number of images given."""

  reason = "image_count_mismatch"


@dataclasses.dataclass
class ProcessedSample:
  """One conversation, unpadded: what :meth:`Processor.encode_sample` returns and :meth:`collate` batches."""

  input_ids: np.ndarray  # int32 [L]
  labels: np.ndarray  # int32 [L]; IGNORE_INDEX outside assistant targets
  pixel_values: np.ndarray  # float32 [num_tiles, H, W, 3] (num_tiles may be 0)
  grids: tuple[TileGrid, ...]  # one per image, in order
  text: str  # the rendered prompt that was tokenized
  has_targets: bool  # an assistant turn is present

  @property
  def num_tiles(self) -> int:
    return int(self.pixel_values.shape[0])


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
  """Image-context tokens per tile: (image_size/patch_size)^2 * downsample_ratio^2 (256 at 448/14/0.5)."""
  if image_size % patch_size:
    raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
  side = image_size // patch_size * downsample_ratio
  if side <= 0 or abs(side - round(side)) > 1e-9:
    raise ValueError(
      f"(image_size/patch_size)*downsample_ratio = {image_size // patch_size}*{downsample_ratio} "
      "must be a positive integer"
    )
  return int(round(side)) ** 2


class Processor:
  """Turns chat messages with ``<image>`` marks plus images into NVLM inputs (see module docstring)."""

  def __init__(
    self,
    tokenizer: NvlmTokenizer,
    *,
    image_size: int = 448,
    patch_size: int = 14,
    downsample_ratio: float = 0.5,
    max_tiles_per_image: int = 6,
    min_tiles_per_image: int = 1,
    use_thumbnail: bool = True,
    use_tiling: bool = True,
    max_tiles_per_sample: int | None = None,
    tile_tag_format: str = "1d",
    global_tile_tag: str = DEFAULT_GLOBAL_TILE_TAG,
    image_context_token: str = VISION_PAD,
    image_start: str = IMAGE_START,
    image_end: str = IMAGE_END,
    chat_format: str = "chatml",
    target_turn_newline: bool = False,
    fusion: str = "d",
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
  ):
    self.tokenizer = tokenizer
    self.image_size, self.patch_size, self.downsample_ratio = int(image_size), int(patch_size), downsample_ratio
    self.tokens_per_tile = tokens_per_tile(self.image_size, self.patch_size, downsample_ratio)
    if not 1 <= min_tiles_per_image <= max_tiles_per_image:
      raise ValueError(
        f"need 1 <= min_tiles_per_image <= max_tiles_per_image, got {min_tiles_per_image}, {max_tiles_per_image}"
      )
    self.max_tiles_per_image, self.min_tiles_per_image = int(max_tiles_per_image), int(min_tiles_per_image)
    self.use_thumbnail, self.use_tiling = bool(use_thumbnail), bool(use_tiling)
    default_slots = tile_upper_bound(
      self.max_tiles_per_image, use_thumbnail=self.use_thumbnail, use_tiling=self.use_tiling
    )
    self.max_tiles_per_sample = int(default_slots if max_tiles_per_sample is None else max_tiles_per_sample)
    if self.max_tiles_per_sample < 1:
      raise ValueError(f"max_tiles_per_sample must be >= 1, got {self.max_tiles_per_sample}")
    self.tile_tag_format = check_tile_tag_format(tile_tag_format)
    self.global_tile_tag = global_tile_tag
    self.image_context_token, self.image_start, self.image_end = image_context_token, image_start, image_end
    self.chat_format = ct.canonical_chat_format(chat_format)
    self.target_turn_newline = bool(target_turn_newline)  # Megatron also trains the "\n" after <|im_end|>
    if fusion not in FUSIONS:
      raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if not hasattr(self, f"_expand_image_{fusion}"):
      raise ValueError(
        f"fusion {fusion!r}: the Processor has no text expansion for it yet "
        f"(add Processor._expand_image_{fusion}); available: "
        f"{[f for f in FUSIONS if hasattr(self, f'_expand_image_{f}')]}"
      )
    self.fusion = fusion
    if fusion == "h":
      if self.tile_tag_format == "none":
        raise ValueError(
          "fusion 'h' needs tile tags (tile_tag_format != 'none'): they separate the one-placeholder "
          "groups of the regular tiles from the thumbnail's group"
        )
      if self.tokens_per_tile < 2:
        raise ValueError(f"fusion 'h' needs tokens_per_tile >= 2, got {self.tokens_per_tile}")
    self.max_image_pixels = max_image_pixels
    self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
    self._check_tokenizer()

  def _check_tokenizer(self) -> None:
    """The tokens we count on must be single, unsplittable tokens, or the image scatter breaks."""
    tok = self.tokenizer
    for token in (ct.IM_START, ct.IM_END, self.image_context_token):
      token_id = tok.token_to_id(token)
      if not tok.is_added(token) or tok.encode(token * 3) != [token_id] * 3:
        raise ValueError(
          f"{tok.source}: {token!r} must be an added special token (a BPE token can be split "
          "or merged with its neighbours)"
        )
    self.image_context_id = tok.token_to_id(self.image_context_token)
    if self.chat_format == "nvlm-yi-34b" and tok.bos_token is None:
      raise ValueError(f"{tok.source}: chat format 'nvlm-yi-34b' needs a bos_token in tokenizer_config.json")

  # ---- construction from a checkpoint directory -------------------------------------------------
  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "Processor":
    """Build from a checkpoint dir: ``tokenizer.json`` (+ ``tokenizer_config.json``) and ``config.json``.

    Image settings come from the NVLM-D top-level keys (``force_image_size``, ``max_dynamic_patch``,
    ``min_dynamic_patch``, ``use_thumbnail``, ``dynamic_image_size``, ``downsample_ratio``,
    ``vision_config.patch_size``, ``image_token_id``) or from the transformers InternVL layout
    (``vision_config.image_size``, ``image_token_id``, ``<img>``/``</img>``, optional
    ``preprocessor_config.json``). Keys under ``"nvlm_jax"`` (any constructor argument, e.g. ``tile_tag_format``,
    ``fusion``; our export writes the training run's) win over both, and
    ``overrides`` win over everything. Missing NVLM-D keys default to NVLM-D-72B's inference settings.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
      raise FileNotFoundError(f"{config_file}: config.json not found (needed for the image settings)")
    with open(config_file, encoding="utf-8") as f:
      config = json.load(f)
    tokenizer = NvlmTokenizer.from_pretrained(directory)
    settings = processor_settings_from_config(config, tokenizer, directory=directory)
    settings.update(overrides)
    return cls(tokenizer, **settings)

  # ---- per-image text ----------------------------------------------------------------------------
  def expand_image(self, grid: TileGrid) -> str:
    """The text that replaces one ``<image>`` mark, for this processor's fusion variant."""
    tags = tile_tags(grid, self.tile_tag_format, global_tag=self.global_tile_tag)
    return getattr(self, f"_expand_image_{self.fusion}")(grid, tags)

  def _expand_image_d(self, grid: TileGrid, tags: list[str]) -> str:
    """NVLM-D: every tile's tag followed by its ``tokens_per_tile`` image-context placeholders."""
    return expand_image_text(
      tags,
      context_token=self.image_context_token,
      tokens_per_tile=self.tokens_per_tile,
      image_start=self.image_start,
      image_end=self.image_end,
    )

  def _expand_image_x(self, grid: TileGrid, tags: list[str]) -> str:
    """NVLM-X: every tile's tag followed by ONE placeholder (its anchor); the tiles go to cross-attention."""
    return "".join(self._image_pieces(grid, tags))

  def _expand_image_h(self, grid: TileGrid, tags: list[str]) -> str:
    """NVLM-H: regular tiles as in X (tag + one placeholder); the global view as in D (tag + its tokens)."""
    return "".join(self._image_pieces(grid, tags))

  def tile_placeholder_counts(self, grid: TileGrid) -> list[int]:
    """Image-context placeholders after each tile's tag, for this processor's fusion variant."""
    n, full = grid.num_tiles, self.tokens_per_tile
    if self.fusion == "d":
      return [full] * n
    if self.fusion == "x":
      return [1] * n
    has_global_view = grid.has_thumbnail or grid.num_regular_tiles == 1
    return [full if (k == n - 1 and has_global_view) else 1 for k in range(n)]

  def _image_pieces(self, grid: TileGrid, tags: list[str] | None = None) -> list[str]:
    """The image text as the pieces X/H tokenize one by one: ``<Image>``, tag, placeholders, ..., ``</Image>``."""
    if tags is None:
      tags = tile_tags(grid, self.tile_tag_format, global_tag=self.global_tile_tag)
    pieces = [self.image_start]
    for tag, count in zip(tags, self.tile_placeholder_counts(grid)):
      if tag:
        pieces.append(tag)
      pieces.append(self.image_context_token * count)
    pieces.append(self.image_end)
    return pieces

  @property
  def image_start_token_ids(self) -> tuple[int, ...]:
    """``<Image>`` tokenized on its own: how NVLM-X/H find where an image's first tile tag begins."""
    return tuple(self.tokenizer.encode(self.image_start))

  def model_token_ids(self) -> dict[str, Any]:
    """The NVLMConfig fields that must agree with this processor's tokenizer."""
    ids = {"image_token_id": self.image_context_id}
    if self.fusion in ("x", "h"):
      ids["image_start_token_ids"] = self.image_start_token_ids
    return ids

  def _encode_pieces(self, text: str, images: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``text`` with each image's pieces encoded on their own (X/H); the text between images is
    encoded as usual. Returns ``(ids, offsets)`` like :meth:`NvlmTokenizer.encode_with_offsets`."""
    ids, offsets = [], []

    def add(start: int, end: int) -> None:
      if end > start:
        piece_ids, piece_offsets = self.tokenizer.encode_with_offsets(text[start:end])
        ids.append(piece_ids)
        offsets.append(piece_offsets + start)

    cursor = 0
    for k, pieces in enumerate(images):
      at = text.find("".join(pieces), cursor)
      if at < 0:  # cannot happen: the expansion was put in the text by encode_sample
        raise AssertionError(f"image {k}: its text was not found in the rendered prompt")
      add(cursor, at)
      for piece in pieces:
        add(at, at + len(piece))
        at += len(piece)
      cursor = at
    add(cursor, len(text))
    if not ids:
      return np.zeros((0,), np.int32), np.zeros((0, 2), np.int64)
    return np.concatenate(ids).astype(np.int32), np.concatenate(offsets).astype(np.int64)

  def image_placeholder_count(self, grid: TileGrid) -> int:
    """Image-context tokens that one image puts in the text (what the model scatters into)."""
    return self.expand_image(grid).count(self.image_context_token)

  # ---- images ------------------------------------------------------------------------------------
  def _tile_cap(self, sizes: Sequence[tuple[int, int]], requested: int, sample_index: int | None) -> int:
    """Largest per-image tile cap <= ``requested`` whose tiles all fit ``max_tiles_per_sample``."""
    if requested < self.min_tiles_per_image:
      raise ValueError(f"max_tiles_per_image={requested} is below min_tiles_per_image={self.min_tiles_per_image}")
    if not sizes:
      return requested
    cap = requested
    if len(sizes) > 1:  # Megatron's rule for multi-image samples
      cap = max(self.min_tiles_per_image, requested // len(sizes))
    while True:
      total = sum(self._plan(w, h, cap).num_tiles for w, h in sizes)
      if total <= self.max_tiles_per_sample:
        return cap
      if cap <= self.min_tiles_per_image:
        raise SampleTooLongError(total, self.max_tiles_per_sample, what="image tiles", sample_index=sample_index)
      cap -= 1

  def _plan(self, width: int, height: int, cap: int) -> TileGrid:
    return plan_grid(
      width,
      height,
      image_size=self.image_size,
      max_tiles=cap,
      min_tiles=self.min_tiles_per_image,
      use_thumbnail=self.use_thumbnail,
      use_tiling=self.use_tiling,
    )

  def preprocess_images(
    self, images: Sequence[Any], *, max_tiles_per_image: int | None = None, sample_index: int | None = None
  ) -> tuple[np.ndarray, tuple[TileGrid, ...]]:
    """Decode + tile + normalise all images of one sample: ``(float32 [n_tiles, H, W, 3], grids)``."""
    where = "" if sample_index is None else f"sample {sample_index}, "
    decoded: list[Image.Image] = []
    for k, source in enumerate(images):
      try:
        decoded.append(load_image(source, max_pixels=self.max_image_pixels))
      except ImageError as err:
        raise ImageError(f"{where}image {k}: {err}", err.reason) from err
    requested = self.max_tiles_per_image if max_tiles_per_image is None else int(max_tiles_per_image)
    cap = self._tile_cap([im.size for im in decoded], requested, sample_index)
    pixels, grids = [], []
    for image in decoded:
      tiles, grid = tile_image(
        image,
        image_size=self.image_size,
        max_tiles=cap,
        min_tiles=self.min_tiles_per_image,
        use_thumbnail=self.use_thumbnail,
        use_tiling=self.use_tiling,
      )
      pixels.append(normalize(tiles, mean=self.image_mean, std=self.image_std))
      grids.append(grid)
    if not pixels:
      return np.zeros((0, self.image_size, self.image_size, 3), np.float32), ()
    return np.concatenate(pixels, axis=0), tuple(grids)

  # ---- one sample ----------------------------------------------------------------------------------
  def encode_sample(
    self,
    messages: Sequence[Mapping[str, Any]],
    images: Sequence[Any] | None = None,
    *,
    add_generation_prompt: bool = False,
    system_prompt: str | None = None,
    max_length: int | None = None,
    max_tiles_per_image: int | None = None,
    sample_index: int | None = None,
  ) -> ProcessedSample:
    """Process one conversation without padding (the data pipeline's entry point)."""
    where = "conversation" if sample_index is None else f"sample {sample_index}"
    _check_max_length(max_length)
    images = _as_image_list(images)
    messages = ct.validate_messages(messages, where=where)
    if not messages:
      raise ValueError(f"{where}: no messages")
    if system_prompt is not None and ct.IMAGE_MARK in system_prompt:
      raise ValueError(f"{where}: {ct.IMAGE_MARK} marks are not allowed in system_prompt")
    num_marks = 0
    for i, message in enumerate(messages):
      content = message["content"]
      if self.image_context_token in content:
        raise ValueError(
          f"{where}: message {i} contains the image-context token {self.image_context_token!r} "
          "as text; use <image> marks"
        )
      if ct.IMAGE_MARK in content and message["role"] == "assistant":
        raise ValueError(f"{where}: message {i}: {ct.IMAGE_MARK} is not allowed in assistant content")
      num_marks += content.count(ct.IMAGE_MARK)
    if num_marks != len(images):
      raise ImageCountMismatchError(
        f"{where}: {num_marks} {ct.IMAGE_MARK} mark(s) in the messages but {len(images)} image(s) given"
      )

    pixel_values, grids = self.preprocess_images(
      images, max_tiles_per_image=max_tiles_per_image, sample_index=sample_index
    )
    expansions = iter([self.expand_image(grid) for grid in grids])
    for message in messages:
      pieces = message["content"].split(ct.IMAGE_MARK)
      message["content"] = pieces[0] + "".join(next(expansions) + piece for piece in pieces[1:])

    segments = ct.render_chat(
      messages,
      chat_format=self.chat_format,
      system_prompt=system_prompt,
      add_generation_prompt=add_generation_prompt,
      bos_token=self.tokenizer.bos_token,
      target_turn_newline=self.target_turn_newline,
    )
    text = ct.render_text(segments)
    if self.fusion == "d":
      input_ids, offsets = self.tokenizer.encode_with_offsets(text)
    else:
      input_ids, offsets = self._encode_pieces(text, [self._image_pieces(g) for g in grids])
    is_target = np.zeros(input_ids.shape, dtype=bool)
    for start, end in ct.target_char_spans(segments):
      is_target |= (offsets[:, 0] >= start) & (offsets[:, 0] < end)
    labels = np.where(is_target, input_ids, IGNORE_INDEX).astype(np.int32)

    expected = sum(self.image_placeholder_count(g) for g in grids)
    found = int(np.sum(input_ids == self.image_context_id))
    if found != expected:  # only possible with a tokenizer that merges the placeholder with its neighbours
      raise ValueError(f"{where}: expected {expected} image-context tokens after tokenization, found {found}")
    if max_length is not None and input_ids.shape[0] > max_length:
      raise SampleTooLongError(
        int(input_ids.shape[0]), max_length, sample_index=sample_index, num_tiles=int(pixel_values.shape[0])
      )
    has_targets = any(m["role"] == "assistant" for m in messages)
    return ProcessedSample(input_ids, labels, pixel_values, grids, text, has_targets)

  # ---- batching ------------------------------------------------------------------------------------
  def collate(
    self,
    samples: Sequence[ProcessedSample],
    *,
    padding: bool | str = "longest",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
    return_labels: bool | None = None,
  ) -> dict[str, np.ndarray]:
    """Pad samples into a batch. ``padding``: "longest" (or True), "max_length" (pad to ``max_length``),
    or "do_not_pad" (or False; all samples must then have the same length)."""
    _check_max_length(max_length)
    if not samples:
      raise ValueError("collate: no samples")
    if padding_side not in ("right", "left"):
      raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = [s.input_ids.shape[0] for s in samples]
    if padding in (True, "longest"):
      length = max(lengths)
    elif padding == "max_length":
      if max_length is None:
        raise ValueError("padding='max_length' needs max_length")
      length = max_length
    elif padding in (False, "do_not_pad"):
      if len(set(lengths)) != 1:
        raise ValueError(f"padding disabled but samples have different lengths {lengths}")
      length = lengths[0]
    else:
      raise ValueError(f"unknown padding {padding!r}; use 'longest', 'max_length' or 'do_not_pad'")
    if pad_to_multiple_of:
      length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    for i, n in enumerate(lengths):
      if n > length:
        raise SampleTooLongError(n, length, sample_index=i, num_tiles=samples[i].num_tiles)

    batch, size, slots = len(samples), self.image_size, self.max_tiles_per_sample
    input_ids = np.full((batch, length), self.tokenizer.pad_id, np.int32)
    attention_mask = np.zeros((batch, length), np.int32)
    labels = np.full((batch, length), IGNORE_INDEX, np.int32)
    pixel_values = np.zeros((batch, slots, size, size, 3), np.float32)
    tile_mask = np.zeros((batch, slots), bool)
    for b, sample in enumerate(samples):
      n = sample.input_ids.shape[0]
      span = slice(0, n) if padding_side == "right" else slice(length - n, length)
      input_ids[b, span] = sample.input_ids
      attention_mask[b, span] = 1
      labels[b, span] = sample.labels
      t = sample.num_tiles
      if t > slots:
        raise SampleTooLongError(t, slots, what="image tiles", sample_index=b)
      pixel_values[b, :t] = sample.pixel_values
      tile_mask[b, :t] = True
    out = {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "pixel_values": pixel_values,
      "tile_mask": tile_mask,
    }
    if return_labels or (return_labels is None and any(s.has_targets for s in samples)):
      out["labels"] = labels
    return out

  def __call__(
    self,
    messages,
    images=None,
    *,
    add_generation_prompt: bool = False,
    system_prompt: str | None = None,
    max_length: int | None = None,
    padding: bool | str = "longest",
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
    max_tiles_per_image: int | None = None,
    return_labels: bool | None = None,
  ) -> dict[str, np.ndarray]:
    """Process one conversation (list of message dicts) or a batch (list of such lists).

    ``images``: for one conversation, an image or a list of images; for a batch, one such entry (or None)
    per conversation. Returns numpy arrays with a batch dimension; ``labels`` only when an assistant turn
    is present (or ``return_labels=True``).
    """
    if _is_batch(messages):
      conversations = list(messages)
      if images is None:
        per_sample = [None] * len(conversations)
      elif isinstance(images, (list, tuple)) and len(images) == len(conversations):
        per_sample = list(images)
      else:
        got = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
        raise ValueError(
          f"batch of {len(conversations)} conversations needs one images entry per conversation "
          f"(a list of length {len(conversations)}), got {got}"
        )
      indices = list(range(len(conversations)))
    else:
      conversations, per_sample, indices = [messages], [images], [None]
    samples = [
      self.encode_sample(
        conv,
        imgs,
        add_generation_prompt=add_generation_prompt,
        system_prompt=system_prompt,
        max_length=max_length,
        max_tiles_per_image=max_tiles_per_image,
        sample_index=idx,
      )
      for conv, imgs, idx in zip(conversations, per_sample, indices)
    ]
    return self.collate(
      samples,
      padding=padding,
      max_length=max_length,
      pad_to_multiple_of=pad_to_multiple_of,
      padding_side=padding_side,
      return_labels=return_labels,
    )

  # ---- decoding ------------------------------------------------------------------------------------
  def decode(self, ids, *, skip_special_tokens: bool = False, unknown: str | None = None) -> str:
    """Text of a 1-D id sequence; negative ids (IGNORE_INDEX in labels) are dropped, an id past the
    vocabulary is an error naming it (or reads as `unknown`: NvlmTokenizer.decode)."""
    ids = np.asarray(ids).reshape(-1)
    return self.tokenizer.decode(ids[ids >= 0].tolist(), skip_special_tokens=skip_special_tokens, unknown=unknown)

  def batch_decode(self, ids, *, skip_special_tokens: bool = False, unknown: str | None = None) -> list[str]:
    return [self.decode(row, skip_special_tokens=skip_special_tokens, unknown=unknown) for row in np.asarray(ids)]


def _check_max_length(max_length) -> None:
  if max_length is not None and (
    isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length <= 0
  ):
    raise ValueError(f"max_length={max_length!r}: must be a positive number of tokens (or None for no limit)")


def _is_batch(messages) -> bool:
  return isinstance(messages, (list, tuple)) and len(messages) > 0 and isinstance(messages[0], (list, tuple))


def _as_image_list(images) -> list:
  if images is None:
    return []
  if isinstance(images, (list, tuple)):
    return list(images)
  return [images]


def _square(value, key: str) -> int:
  """InternVL configs store sizes as int or [h, w]; we need square tiles."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"config.json: {key}={value} is not square; only square tiles are supported")
    value = value[0]
  return int(value)


def processor_settings_from_config(
  config: Mapping[str, Any], tokenizer: NvlmTokenizer, *, directory: Path | None = None
) -> dict[str, Any]:
  """Processor keyword arguments read from a checkpoint ``config.json`` (see Processor.from_pretrained)."""
  vision = config.get("vision_config") or {}
  project = config.get("nvlm_jax") or {}
  settings: dict[str, Any] = {
    "patch_size": _square(vision.get("patch_size", 14), "vision_config.patch_size"),
    "downsample_ratio": float(config.get("downsample_ratio", 0.5)),
  }
  is_internvl = config.get("model_type") == "internvl" or (
    "image_token_id" in config and "force_image_size" not in config
  )
  if is_internvl:
    settings["image_size"] = _square(vision.get("image_size", 448), "vision_config.image_size")
    token_id = config.get("image_token_id")
    token = tokenizer.id_to_token(token_id) if token_id is not None else None
    settings["image_context_token"] = token or IMG_CONTEXT
    settings["image_start"], settings["image_end"] = INTERNVL_IMAGE_START, INTERNVL_IMAGE_END
    settings["tile_tag_format"] = "none"
    pre_file = None if directory is None else directory / "preprocessor_config.json"
    if pre_file is not None and pre_file.is_file():
      with open(pre_file, encoding="utf-8") as f:
        pre = json.load(f)
      if "max_patches" in pre:
        settings["max_tiles_per_image"] = int(pre["max_patches"])
      if "min_patches" in pre:
        settings["min_tiles_per_image"] = int(pre["min_patches"])
      if "crop_to_patches" in pre:
        settings["use_tiling"] = bool(pre["crop_to_patches"])
  else:
    size = config.get("force_image_size") or vision.get("image_size") or 448
    settings["image_size"] = _square(size, "force_image_size")
    settings["use_tiling"] = bool(config.get("dynamic_image_size", True))
    settings["max_tiles_per_image"] = int(config.get("max_dynamic_patch", 6))
    settings["min_tiles_per_image"] = int(config.get("min_dynamic_patch", 1))
    settings["use_thumbnail"] = bool(config.get("use_thumbnail", True))
    token_id = config.get("image_token_id")  # our export writes it; the release names <|vision_pad|> only
    if isinstance(token_id, int):
      token = tokenizer.id_to_token(token_id)
      if token is None:
        raise ValueError(
          f"{directory or ''}/config.json: image_token_id {token_id} is not in the vocabulary of "
          f"{tokenizer.source} ({tokenizer.vocab_size} tokens)"
        )
      settings["image_context_token"] = token
  template = config.get("template")
  if isinstance(template, str):
    try:
      settings["chat_format"] = ct.canonical_chat_format(template)
    except ValueError:
      log.warning("config.json template %r is not a known chat format; using chatml", template)
  known = _constructor_keys()
  settings.update({k: v for k, v in project.items() if k in known})
  return settings


def _constructor_keys() -> set[str]:
  import inspect

  params = inspect.signature(Processor.__init__).parameters
  return {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
