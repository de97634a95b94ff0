"""Decode any image the data or the user hands us into a fully loaded 8-bit RGB PIL image.

Why a module of its own: NVLM's reference preprocessing starts from ``Image.open(f).convert("RGB")``,
which silently does the wrong thing for several inputs (alpha becomes black, 16-bit grey clips to white,
a truncated file only fails later, deep inside tiling, or worse in a data-loader worker). Here every
failure becomes an :class:`ImageError` that names the source and the problem, and every PIL mode has a
deliberate conversion:

* ``RGB``: unchanged (copied, so the result never aliases the caller's image or an open file).
* Alpha modes (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``) and ``L``/``RGB``/``P`` images that
  carry a ``transparency`` entry: composited over white. (The reference's plain ``convert("RGB")`` drops
  alpha, which turns transparent backgrounds, e.g. of logos and charts, into whatever colour the hidden
  pixels hold, usually black.)
* ``I;16*`` (16-bit grey): scaled to 8 bits with ``round(v / 257)`` (PIL's own convert clips at 255).
* ``I`` (32-bit int, e.g. some TIFFs): values already in [0, 255] are kept; values in [0, 65535] are
  scaled as 16-bit; anything else is min-max stretched to [0, 255].
* ``F`` (float): values in [0, 1] are scaled by 255; values in [0, 255] are kept; anything else is
  min-max stretched. NaN becomes 0.
* Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``): PIL's ``convert("RGB")``.

Decompression bombs are refused with our own pixel limit (``max_pixels``) checked on the header size before
any pixel is decoded; PIL's global bomb warning is silenced inside the call and PIL's own hard error (at
twice ``Image.MAX_IMAGE_PIXELS``) is translated into the same :class:`ImageError`. Multi-frame images
(GIF, APNG, TIFF stacks) give their first frame. EXIF orientation is NOT applied unless asked, because the
NVLM reference pipeline does not apply it either (the model was trained on un-rotated pixels).

Note: if some other code sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` process-wide, PIL stops
raising on truncated files and such images decode with grey filler; this module does not touch that global.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

# 8192 x 8192. Generous for documents/infographics (InfoVQA pages are ~10 Mpx), far below what would
# exhaust memory in a data-loader worker. Pass max_pixels=None to disable the check.
DEFAULT_MAX_PIXELS = 1 << 26

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_TRANSPARENCY_CAPABLE = ("1", "L", "P", "RGB")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# ImageError.reason values (the data pipeline counts skipped samples by reason).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
DECOMPRESSION_BOMB = "decompression_bomb"


class ImageError(ValueError):
  """An image could not be turned into RGB pixels; the message names the source and the problem.

  ``reason`` is one of MISSING_IMAGE (no such file, empty input, URL), DECOMPRESSION_BOMB or CORRUPT_IMAGE.
  """

  def __init__(self, message: str, reason: str = CORRUPT_IMAGE):
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):  # keep `reason` across pickling (multiprocess data loaders)
    return type(self), (str(self), self.reason)


def describe_source(source: object) -> str:
  """Short human-readable name of an image source, used in every error message."""
  if isinstance(source, (str, os.PathLike)):
    text = os.fspath(source)
    if isinstance(text, str) and text.startswith("data:"):
      return f"<data URI, {len(text)} chars>"
    return str(text)
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f"<{len(source)} bytes>"
  if isinstance(source, Image.Image):
    return f"<PIL image mode={source.mode} size={source.size[0]}x{source.size[1]}>"
  if hasattr(source, "read"):
    return f"<file object {getattr(source, 'name', type(source).__name__)}>"
  return f"<{type(source).__name__}>"


def load_image(
  source: ImageSource,
  *,
  max_pixels: int | None = DEFAULT_MAX_PIXELS,
  apply_exif_orientation: bool = False,
) -> Image.Image:
  """Decode ``source`` (path, encoded bytes, ``data:`` URI, binary file object or PIL image) into RGB.

  The returned image is fully decoded, in mode ``RGB`` and independent of ``source`` (no open file).
  Raises :class:`ImageError` for missing/unreadable/corrupt/truncated data, zero-sized images and images
  with more than ``max_pixels`` pixels; ``TypeError`` for a source of an unsupported type.
  """
  name = describe_source(source)
  if isinstance(source, Image.Image):
    image = _checked_loaded(source, name, max_pixels)
    return _finish(image, name, apply_exif_orientation)

  stream = _open_stream(source, name)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      try:
        opened = Image.open(stream)
      except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: refused as a decompression bomb ({err})", DECOMPRESSION_BOMB) from err
      except Image.UnidentifiedImageError as err:
        raise ImageError(f"{name}: not a recognised image format (cannot identify image data)") from err
      except Exception as err:  # noqa: BLE001 - PIL raises many types for garbage headers
        raise ImageError(f"{name}: cannot read image header ({type(err).__name__}: {err})") from err
      with opened:
        image = _checked_loaded(opened, name, max_pixels)
        return _finish(image, name, apply_exif_orientation)
  finally:
    if not hasattr(source, "read"):
      stream.close()


def _open_stream(source: object, name: str):
  """A binary stream over the encoded bytes; missing files and URLs become ImageError."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    if len(source) == 0:
      raise ImageError(f"{name}: empty input, no image data", MISSING_IMAGE)
    return io.BytesIO(bytes(source))
  if isinstance(source, (str, os.PathLike)):
    text = os.fspath(source)
    if isinstance(text, bytes):
      text = text.decode(errors="replace")
    if text.startswith("data:"):
      return io.BytesIO(_decode_data_uri(text, name))
    if text.startswith(("http://", "https://")):
      raise ImageError(
        f"{name}: URLs are not supported (nothing is downloaded); pass a local path or bytes", MISSING_IMAGE
      )
    path = Path(text)
    if not path.exists():
      raise ImageError(f"{name}: image file not found", MISSING_IMAGE)
    if path.is_dir():
      raise ImageError(f"{name}: is a directory, not an image file", MISSING_IMAGE)
    try:
      data = path.read_bytes()
    except OSError as err:
      raise ImageError(f"{name}: cannot read file ({err.strerror or err})", MISSING_IMAGE) from err
    if not data:
      raise ImageError(f"{name}: empty file, no image data", MISSING_IMAGE)
    return io.BytesIO(data)
  if hasattr(source, "read"):
    return source
  raise TypeError(
    f"load_image: unsupported image source type {type(source).__name__}; "
    "expected a path, bytes, a data: URI, a binary file object or a PIL.Image.Image"
  )


def _decode_data_uri(uri: str, name: str) -> bytes:
  header, sep, payload = uri.partition(",")
  if not sep or ";base64" not in header:
    raise ImageError(f"{name}: only base64 data: URIs are supported")
  try:
    data = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError) as err:
    raise ImageError(f"{name}: invalid base64 payload ({err})") from err
  if not data:
    raise ImageError(f"{name}: empty data: URI", MISSING_IMAGE)
  return data


def _checked_loaded(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
  """Size checks on the header, then a forced full decode so truncation fails here, not later."""
  width, height = image.size
  if width <= 0 or height <= 0:
    raise ImageError(f"{name}: image has zero size ({width}x{height})")
  if max_pixels is not None and width * height > max_pixels:
    raise ImageError(
      f"{name}: refused as a decompression bomb: {width}x{height} = {width * height} pixels "
      f"exceeds the limit of {max_pixels} pixels (max_pixels)",
      DECOMPRESSION_BOMB,
    )
  try:
    image.load()
  except Exception as err:  # noqa: BLE001 - truncated/corrupt data raise OSError, SyntaxError, zlib.error, ...
    raise ImageError(f"{name}: corrupt or truncated image data ({type(err).__name__}: {err})") from err
  return image


def _finish(image: Image.Image, name: str, apply_exif_orientation: bool) -> Image.Image:
  try:
    if apply_exif_orientation:
      image = ImageOps.exif_transpose(image)
    rgb = to_rgb(image)
  except ImageError:
    raise
  except Exception as err:  # noqa: BLE001
    raise ImageError(f"{name}: cannot convert mode {image.mode} to RGB ({type(err).__name__}: {err})") from err
  if rgb is image:
    rgb = image.copy()
  return rgb


def to_rgb(image: Image.Image) -> Image.Image:
  """Convert a loaded PIL image of any mode to 8-bit RGB (see the module docstring for the rules)."""
  mode = image.mode
  if mode == "RGB" and "transparency" not in image.info:
    return image
  if mode in _ALPHA_MODES or (mode in _TRANSPARENCY_CAPABLE and "transparency" in image.info):
    return _composite_on_white(image)
  if mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(image).astype(np.float64)
    return _grey_to_rgb(np.rint(values / 257.0))
  if mode == "I":
    values = np.asarray(image).astype(np.float64)
    return _grey_to_rgb(_rescale(values, integer=True))
  if mode == "F":
    values = np.asarray(image).astype(np.float64)
    return _grey_to_rgb(_rescale(values, integer=False))
  return image.convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
  if image.mode == "La":
    image = image.convert("LA")
  rgba = image.convert("RGBA")
  background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(background, rgba).convert("RGB")


def _rescale(values: np.ndarray, *, integer: bool) -> np.ndarray:
  values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
  lo, hi = float(values.min()), float(values.max())
  if lo >= 0.0 and hi <= 255.0 and (integer or hi > 1.0):
    return np.rint(values)
  if not integer and lo >= 0.0 and hi <= 1.0:
    return np.rint(values * 255.0)
  if integer and lo >= 0.0 and hi <= 65535.0:
    return np.rint(values / 257.0)
  if hi == lo:
    return np.zeros_like(values)
  return np.rint((values - lo) * (255.0 / (hi - lo)))


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
  grey = np.clip(values, 0, 255).astype(np.uint8)
  return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
