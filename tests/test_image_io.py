"""load_image: every PIL mode becomes RGB; broken inputs raise ImageError naming the source and the problem."""

import base64
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from nvlm_jax.vision.image_io import (
  CORRUPT_IMAGE,
  DECOMPRESSION_BOMB,
  DEFAULT_MAX_PIXELS,
  MISSING_IMAGE,
  ImageError,
  load_image,
)


def encode(image, fmt, **kwargs):
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


def rgb_noise(w=32, h=24, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_with_header_size(width, height):
  """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed): a decompression-bomb header."""
  data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
  ihdr = 8 + 8  # signature, then length + b"IHDR"
  data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
  crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
  data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
  return bytes(data)


def check_rgb(image, size):
  assert image.mode == "RGB" and image.size == size
  return np.asarray(image)


# ---------------------------------------------------------------- modes ------------------------------------
@pytest.mark.parametrize(
  "mode",
  [
    "1",
    "L",
    "P",
    "RGB",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "F",
    "I;16",
    "I;16B",
    "I;16L",
    "RGBA",
    "LA",
    "PA",
    "RGBa",
    "La",
  ],
)
def test_every_mode_becomes_rgb(mode):
  base = rgb_noise()
  if mode in ("I", "F", "I;16", "I;16B", "I;16L"):
    image = Image.new(mode, base.size)
  elif mode in ("RGBa", "La", "PA"):
    image = Image.new(mode, base.size)
  else:
    image = base.convert(mode)
  out = load_image(image)
  check_rgb(out, base.size)
  assert out is not image


def test_rgb_roundtrip_is_exact_and_detached():
  image = rgb_noise()
  out = load_image(image)
  assert np.array_equal(np.asarray(out), np.asarray(image)) and out is not image
  assert np.array_equal(np.asarray(load_image(encode(image, "PNG"))), np.asarray(image))


def test_alpha_is_composited_on_white():
  rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
  rgba.putpixel((0, 0), (10, 20, 30, 255))
  rgba.putpixel((1, 0), (0, 0, 0, 128))
  out = np.asarray(load_image(encode(rgba, "PNG")))
  assert out[0, 0].tolist() == [10, 20, 30]
  assert out[1, 1].tolist() == [255, 255, 255]  # fully transparent -> white, not the hidden colour
  assert 120 <= out[0, 1, 0] <= 130  # half-transparent black over white -> mid grey
  la = Image.new("LA", (2, 2), (0, 0))
  assert np.asarray(load_image(la)).min() == 255


def test_palette_with_and_without_transparency():
  p = Image.new("P", (4, 4), 1)
  p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
  assert np.asarray(load_image(encode(p, "PNG")))[0, 0].tolist() == [0, 255, 0]
  p.info["transparency"] = 1
  out = np.asarray(load_image(encode(p, "PNG", transparency=1)))
  assert out[0, 0].tolist() == [255, 255, 255]
  gif = np.asarray(load_image(encode(p, "GIF", transparency=1)))
  assert gif[0, 0].tolist() == [255, 255, 255]


def test_grey_with_transparency_entry():
  grey = Image.new("L", (3, 3), 7)
  out = np.asarray(load_image(encode(grey, "PNG", transparency=7)))
  assert out.min() == 255


def test_sixteen_bit_is_scaled_not_clipped():
  values = np.array([[0, 257, 257 * 100], [257 * 200, 65535, 128]], dtype=np.uint16)
  image16 = Image.fromarray(values)
  assert image16.mode == "I;16"
  for source in (image16, encode(image16, "PNG"), encode(image16, "TIFF")):
    out = np.asarray(load_image(source))[..., 0]
    assert out.tolist() == [[0, 1, 100], [200, 255, 0]]
  big_endian = Image.frombytes("I;16B", (3, 2), values.astype(">u2").tobytes())
  assert np.asarray(load_image(big_endian))[..., 0].tolist() == [[0, 1, 100], [200, 255, 0]]


def test_int32_and_float_modes():
  as_8bit = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
  assert np.asarray(load_image(as_8bit))[0, :, 0].tolist() == [0, 100, 255]
  as_16bit = Image.fromarray(np.array([[0, 257 * 10, 65535]], dtype=np.int32))
  assert np.asarray(load_image(as_16bit))[0, :, 0].tolist() == [0, 10, 255]
  unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
  assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
  wide = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32))
  assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 128, 255]
  nan = Image.fromarray(np.array([[np.nan, 0.25, 1.0]], dtype=np.float32))
  assert np.asarray(load_image(nan))[0, :, 0].tolist() == [0, 64, 255]
  assert np.asarray(load_image(encode(unit, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg_and_bilevel():
  white_cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
  assert np.asarray(load_image(encode(white_cmyk, "JPEG"))).min() >= 250
  bilevel = Image.new("1", (8, 8), 1)
  assert np.asarray(load_image(encode(bilevel, "PNG"))).min() == 255


def test_animated_gif_gives_first_frame():
  frames = [Image.new("RGB", (4, 4), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
  buf = io.BytesIO()
  frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
  out = np.asarray(load_image(buf.getvalue()))
  assert out[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_only_when_asked():
  image = rgb_noise(30, 10)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  data = encode(image, "JPEG", exif=exif.tobytes())
  assert load_image(data).size == (30, 10)
  assert load_image(data, apply_exif_orientation=True).size == (10, 30)


# ---------------------------------------------------------------- sources ----------------------------------
def test_sources_path_str_bytes_datauri_fileobj(tmp_path):
  image = rgb_noise()
  data = encode(image, "PNG")
  path = tmp_path / "x.png"
  path.write_bytes(data)
  uri = "data:image/png;base64," + base64.b64encode(data).decode()
  for source in (path, str(path), data, bytearray(data), memoryview(data), uri, io.BytesIO(data)):
    assert np.array_equal(np.asarray(load_image(source)), np.asarray(image))


def test_unsupported_source_type():
  with pytest.raises(TypeError, match="unsupported image source type int"):
    load_image(3)


# ---------------------------------------------------------------- failures ---------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(fmt, tmp_path):
  data = encode(rgb_noise(64, 64), fmt)
  cut = data[: len(data) // 2]
  with pytest.raises(ImageError, match=rf"<{len(cut)} bytes>: corrupt or truncated") as info:
    load_image(cut)
  assert info.value.reason == CORRUPT_IMAGE
  copy = pickle.loads(pickle.dumps(info.value))  # survives multiprocess data loaders
  assert copy.reason == CORRUPT_IMAGE and str(copy) == str(info.value)
  path = tmp_path / f"cut.{fmt.lower()}"
  path.write_bytes(cut)
  with pytest.raises(ImageError, match="cut") as info:
    load_image(path)
  assert str(path) in str(info.value) and "truncated" in str(info.value)


def test_random_and_empty_bytes(tmp_path):
  junk = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
  with pytest.raises(ImageError, match=r"<1000 bytes>: not a recognised image format"):
    load_image(junk)
  with pytest.raises(ImageError, match=r"<0 bytes>: empty"):
    load_image(b"")
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  with pytest.raises(ImageError, match="empty.jpg: empty file"):
    load_image(empty)
  with pytest.raises(ImageError, match="invalid base64"):
    load_image("data:image/png;base64,@@@")


def test_corrupt_png_body():
  data = bytearray(encode(rgb_noise(64, 64), "PNG"))
  data[60:200] = bytes(140)  # clobber compressed image data
  with pytest.raises(ImageError, match=r"<\d+ bytes>: "):
    load_image(bytes(data))


def test_missing_path_and_directory_and_url(tmp_path):
  missing = tmp_path / "nope.png"
  with pytest.raises(ImageError, match="nope.png: image file not found") as info:
    load_image(missing)
  assert info.value.reason == MISSING_IMAGE
  with pytest.raises(ImageError, match="is a directory"):
    load_image(tmp_path)
  with pytest.raises(ImageError, match="URLs are not supported"):
    load_image("https://example.com/cat.png")


def test_decompression_bombs():
  # Our own limit, checked on the header before decoding.
  with pytest.raises(ImageError, match=r"decompression bomb: 9000x9000 = 81000000 pixels exceeds") as info:
    load_image(png_with_header_size(9000, 9000))
  assert info.value.reason == DECOMPRESSION_BOMB
  assert DEFAULT_MAX_PIXELS < 9000 * 9000
  # A header so large that PIL's own hard check fires inside Image.open: same error type and source name.
  with pytest.raises(ImageError, match=r"<\d+ bytes>: refused as a decompression bomb") as info:
    load_image(png_with_header_size(100_000, 100_000))
  assert info.value.reason == DECOMPRESSION_BOMB
  # PIL images and explicit limits.
  with pytest.raises(ImageError, match=r"mode=L size=100x100>: refused as a decompression bomb"):
    load_image(Image.new("L", (100, 100)), max_pixels=9999)
  assert load_image(Image.new("L", (100, 100)), max_pixels=10000).size == (100, 100)


def test_zero_size_image():
  with pytest.raises(ImageError, match="zero size"):
    load_image(Image.new("RGB", (0, 5)))
