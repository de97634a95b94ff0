"""The record: the one unit every data source yields, and the checks that decide if it is usable.

Schema (plain Python types only, so records pickle cheaply across grain worker processes)::

    {
      "id":       str,                       # sample id, unique within its source; used in every error
      "source":   str,                       # which source / blend component it came from (for counting)
      "messages": [{"role": "system" | "user" | "assistant", "content": str}, ...],
      "images":   [bytes | str, ...],        # ENCODED image bytes (PNG/JPEG/...) or a file path, in order
      "error":    {"reason": str, "detail": str},   # OPTIONAL: set by a source that could not parse the entry
    }

Each image is referred to by one literal ``<image>`` mark (``IMAGE_MARK``) inside a user turn, in the same
order as ``images``; the processor later replaces the k-th mark with the tile-tagged image tokens.

Images stay encoded until the pipeline's map step decodes them, so that a bad image is found (and counted)
there, not while a source is being indexed. Sources never raise for a malformed entry: they return a record
(with ``error`` set when they could not even build messages), and the pipeline calls ``validate_record``,
which raises ``BadSampleError`` with a short ``reason`` the pipeline can count and skip on.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, NotRequired, TypedDict, Union

from PIL import Image

from nvlm_jax.vision.image_io import DEFAULT_MAX_PIXELS

IMAGE_MARK = "<image>"
ROLES = ("system", "user", "assistant")

# Bad-sample reasons (enum-like strings; the pipeline counts samples per reason).
MISSING_IMAGE = "missing_image"  # path does not exist / empty bytes
CORRUPT_IMAGE = "corrupt_image"  # bytes are not a readable image
DECOMPRESSION_BOMB = "decompression_bomb"  # declared pixel count above the limit
IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # number of <image> marks != number of images
EMPTY_CONVERSATION = "empty_conversation"  # no user question or no non-empty assistant answer
MALFORMED_CONVERSATION = "malformed_conversation"  # unparseable entry, bad roles/types/turn order
TOO_LONG = "too_long"  # over a length limit (text chars, image count, or tokens in the pipeline)
BAD_SAMPLE_REASONS = frozenset(
  {
    MISSING_IMAGE,
    CORRUPT_IMAGE,
    DECOMPRESSION_BOMB,
    IMAGE_COUNT_MISMATCH,
    EMPTY_CONVERSATION,
    MALFORMED_CONVERSATION,
    TOO_LONG,
  }
)

# Same limit as the decoder (image_io), so the header probe and the later decode agree on what a bomb is.
DEFAULT_MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS


class Message(TypedDict):
  role: Literal["system", "user", "assistant"]
  content: str


class RecordError(TypedDict):
  reason: str
  detail: str


class Record(TypedDict):
  id: str
  source: str
  messages: list[Message]
  images: list[Union[bytes, str]]
  error: NotRequired[RecordError]


class BadSampleError(ValueError):
  """A sample that must be skipped; ``reason`` is one of ``BAD_SAMPLE_REASONS``."""

  def __init__(self, reason: str, sample_id: str, detail: str = ""):
    if reason not in BAD_SAMPLE_REASONS:
      raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {sorted(BAD_SAMPLE_REASONS)}")
    self.reason = reason
    self.sample_id = sample_id
    self.detail = detail
    super().__init__(f"sample {sample_id!r}: {reason}" + (f": {detail}" if detail else ""))

  def __reduce__(self):  # keep the extra fields when the error crosses a process boundary
    return (type(self), (self.reason, self.sample_id, self.detail))


def count_image_marks(messages: Sequence[Mapping]) -> int:
  return sum(str(m.get("content", "")).count(IMAGE_MARK) for m in messages)


def validate_record(
  record: Mapping,
  *,
  check_images: bool = True,
  max_images: int | None = None,
  max_text_chars: int | None = None,
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
  require_answer: bool = True,
) -> None:
  """Raises ``BadSampleError`` if ``record`` cannot be trained on; returns None if it can.

  Structural checks always run. With ``check_images`` each image is probed cheaply: the path must exist
  and the header must parse (size only, no pixel decode); a full decode failure later in the pipeline
  maps to ``corrupt_image`` via ``bad_sample_from_image_error``. ``require_answer``: the conversation
  must end with a non-empty assistant turn (training); set False for prompt-only evaluation records.
  """
  sample_id = str(record.get("id", "<no id>")) if isinstance(record, Mapping) else "<not a mapping>"
  if not isinstance(record, Mapping):
    raise BadSampleError(MALFORMED_CONVERSATION, sample_id, f"record is a {type(record).__name__}")
  if record.get("error"):
    err = record["error"]
    reason, detail = (err.get("reason"), err.get("detail", "")) if isinstance(err, Mapping) else (None, str(err))
    raise BadSampleError(reason if reason in BAD_SAMPLE_REASONS else MALFORMED_CONVERSATION, sample_id, detail)
  if not isinstance(record.get("id"), str):
    raise BadSampleError(MALFORMED_CONVERSATION, sample_id, "'id' must be a str")
  messages, images = record.get("messages"), record.get("images")
  if not isinstance(messages, list):
    raise BadSampleError(MALFORMED_CONVERSATION, sample_id, f"'messages' is a {type(messages).__name__}, not a list")
  if not isinstance(images, list):
    raise BadSampleError(MALFORMED_CONVERSATION, sample_id, f"'images' is a {type(images).__name__}, not a list")

  _check_turns(messages, sample_id, require_answer)

  if max_text_chars is not None:
    n_chars = sum(len(m["content"]) for m in messages)
    if n_chars > max_text_chars:
      raise BadSampleError(TOO_LONG, sample_id, f"{n_chars} text characters > limit {max_text_chars}")
  if max_images is not None and len(images) > max_images:
    raise BadSampleError(TOO_LONG, sample_id, f"{len(images)} images > limit {max_images}")

  n_marks = count_image_marks(messages)
  if n_marks != len(images):
    raise BadSampleError(
      IMAGE_COUNT_MISMATCH, sample_id, f"{n_marks} {IMAGE_MARK} marks in the text but {len(images)} images"
    )
  for k, image in enumerate(images):
    if not isinstance(image, (bytes, bytearray, str, os.PathLike)):
      raise BadSampleError(MALFORMED_CONVERSATION, sample_id, f"image {k} is a {type(image).__name__}")
    if check_images:
      probe_image(image, sample_id=sample_id, index=k, max_image_pixels=max_image_pixels)


def _check_turns(messages: list, sample_id: str, require_answer: bool) -> None:
  expected = "user"
  for k, m in enumerate(messages):
    if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
      raise BadSampleError(
        MALFORMED_CONVERSATION,
        sample_id,
        f"message {k} must be {{'role': one of {ROLES}, 'content': str}}, found {m!r:.80}",
      )
    role = m["role"]
    if role == "system":
      if k != 0:
        raise BadSampleError(MALFORMED_CONVERSATION, sample_id, f"system turn at position {k}, only 0 allowed")
      if IMAGE_MARK in m["content"]:
        raise BadSampleError(MALFORMED_CONVERSATION, sample_id, f"{IMAGE_MARK} mark in the system turn")
      continue
    if role != expected:
      raise BadSampleError(
        MALFORMED_CONVERSATION,
        sample_id,
        f"message {k} is {role!r}, expected {expected!r} (turns must alternate user/assistant)",
      )
    if role == "assistant" and IMAGE_MARK in m["content"]:
      raise BadSampleError(MALFORMED_CONVERSATION, sample_id, f"{IMAGE_MARK} mark in assistant message {k}")
    expected = "assistant" if role == "user" else "user"
  turns = [m for m in messages if m["role"] != "system"]
  if not turns or not any(m["content"].strip() for m in turns if m["role"] == "user"):
    raise BadSampleError(EMPTY_CONVERSATION, sample_id, "no non-empty user turn")
  if require_answer:
    answers = [m for m in turns if m["role"] == "assistant"]
    if not answers or not any(m["content"].strip() for m in answers):
      raise BadSampleError(EMPTY_CONVERSATION, sample_id, "no non-empty assistant answer")
    if turns[-1]["role"] != "assistant":
      raise BadSampleError(MALFORMED_CONVERSATION, sample_id, "conversation ends with an unanswered user turn")


def probe_image(
  image: Union[bytes, bytearray, str, os.PathLike],
  *,
  sample_id: str,
  index: int = 0,
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[int, int]:
  """Returns (width, height) from the image header without decoding pixels; raises BadSampleError."""
  where = f"image {index}"
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    where = f"image {index} ({path})"
    if not os.path.isfile(path):
      raise BadSampleError(MISSING_IMAGE, sample_id, f"{where}: no such file")
    if os.path.getsize(path) == 0:
      raise BadSampleError(MISSING_IMAGE, sample_id, f"{where}: empty file")
    opener = path
  else:
    if len(image) == 0:
      raise BadSampleError(MISSING_IMAGE, sample_id, f"{where}: empty bytes")
    opener = io.BytesIO(bytes(image))
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(opener) as im:
        width, height = im.size
  except Image.DecompressionBombError as e:
    raise BadSampleError(DECOMPRESSION_BOMB, sample_id, f"{where}: {e}") from e
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises UnidentifiedImageError(OSError) and friends
    raise BadSampleError(CORRUPT_IMAGE, sample_id, f"{where}: {e}") from e
  if width <= 0 or height <= 0:
    raise BadSampleError(CORRUPT_IMAGE, sample_id, f"{where}: size {width}x{height}")
  if width * height > max_image_pixels:
    raise BadSampleError(
      DECOMPRESSION_BOMB, sample_id, f"{where}: {width}x{height} = {width * height} pixels > limit {max_image_pixels}"
    )
  return width, height


def bad_sample_from_image_error(sample_id: str, error: Exception, index: int | None = None) -> BadSampleError:
  """Maps an image decode failure (e.g. image_io.ImageError) to a BadSampleError for counting.

  Uses the error's own ``reason`` attribute when it is a known reason; else recognises PIL's bomb error and
  image_io's messages ("decompression bomb", "not found", "empty"); else ``corrupt_image``.
  """
  reason = getattr(error, "reason", None)
  if reason not in BAD_SAMPLE_REASONS:
    chain = [error, error.__cause__, error.__context__]
    message = str(error).lower()
    if any(isinstance(e, Image.DecompressionBombError) for e in chain) or "decompression" in message:
      reason = DECOMPRESSION_BOMB
    elif any(isinstance(e, FileNotFoundError) for e in chain) or "not found" in message or "empty" in message:
      reason = MISSING_IMAGE
    else:
      reason = CORRUPT_IMAGE
  where = f"image {index}: " if index is not None else ""
  return BadSampleError(reason, sample_id, f"{where}{error}")
