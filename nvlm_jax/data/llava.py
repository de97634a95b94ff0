"""LLaVA-style conversation files as a random-access source of records (see records.py).

Accepted files: a JSON list (``.json``) or JSON Lines (``.jsonl``; one entry per non-blank line). Entry::

    {"id": "000123",                                # optional; else "<file stem>:<index>"
     "image": "coco/000123.jpg",                    # one path, or
     "images": ["a.jpg", "b.jpg"],                  # a list (not both); neither key -> text-only
     "system": "Answer the questions.",             # optional top-level system prompt
     "conversations": [{"from": "system"|"human"|"gpt", "value": "<image>\\nWhat is ..."}, ...]}

``from`` also accepts "user"/"assistant" and ``{"role", "content"}`` turns. Image paths are joined to
``image_root`` (default: the file's directory); absolute paths are kept. Images are NOT read here: a record
carries the path and the pipeline decodes it (a missing file is counted there as ``missing_image``).

Missing ``<image>`` mark: if an entry has exactly one image and no ``<image>`` mark anywhere, ``"<image>\\n"``
is prepended to the first user turn (the HF ``chat()`` / Megatron convention, docs/paper.md (e)). With several
images and no marks nothing is guessed: ``validate_record`` reports ``image_count_mismatch``.

Malformed entries never raise from ``__getitem__``: the record comes back with ``error`` set (reason +
file:line or file[index]) so the pipeline can count and skip it. Only an unreadable file raises, at
construction, with ``LlavaFormatError`` naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_jax.data.records import IMAGE_MARK, MALFORMED_CONVERSATION, Record, count_image_marks

ROLE_ALIASES = {
  "human": "user",
  "user": "user",
  "gpt": "assistant",
  "assistant": "assistant",
  "bot": "assistant",
  "model": "assistant",
  "system": "system",
}


class LlavaFormatError(ValueError):
  """The file itself cannot be read (not a JSON list, broken JSON document)."""


class LlavaSource:
  """Random-access source over one LLaVA-style file; usable as ``grain.MapDataset.source(...)``.

  JSON lists are parsed once at construction. JSONL files are indexed by byte offset and each line is
  parsed on access, so a large file costs one scan and little memory, and a broken line only spoils its
  own sample.
  """

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, name: str | None = None):
    self.path = Path(path)
    self.image_root = Path(image_root) if image_root is not None else self.path.parent
    self.name = name or self.path.stem
    if not self.path.is_file():
      raise FileNotFoundError(f"LLaVA file {self.path} does not exist")
    self._entries: list[Any] | None = None
    self._offsets: np.ndarray | None = None  # JSONL: [start, end) byte offsets of each non-blank line
    self._line_numbers: np.ndarray | None = None  # JSONL: 1-based line number of each entry
    self._fd: int | None = None
    if self._is_jsonl():
      self._index_jsonl()
    else:
      self._load_json()

  # ---- file reading -------------------------------------------------------------------------------
  def _is_jsonl(self) -> bool:
    if self.path.suffix.lower() in (".jsonl", ".ndjson"):
      return True
    if self.path.suffix.lower() == ".json":
      return False
    with open(self.path, "rb") as f:  # unknown suffix: a JSON list starts with '['
      head = f.read(4096).lstrip()
    return not head.startswith(b"[")

  def _load_json(self) -> None:
    raw = self.path.read_bytes()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      line = raw[: e.start].count(b"\n") + 1
      raise LlavaFormatError(
        f"{self.path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); LLaVA JSON files must be UTF-8"
      ) from None
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise LlavaFormatError(f"{self.path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    if not isinstance(data, list):
      raise LlavaFormatError(
        f"{self.path}: top level is a {type(data).__name__}; expected a JSON list "
        "of entries (or use .jsonl for one entry per line)"
      )
    self._entries = data

  def _index_jsonl(self) -> None:
    offsets, lines = [], []
    offset = 0
    with open(self.path, "rb") as f:
      for line_no, line in enumerate(f, start=1):
        if line.strip():
          offsets.append((offset, offset + len(line)))
          lines.append(line_no)
        offset += len(line)
    self._offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    self._line_numbers = np.asarray(lines, dtype=np.int64)
    self._fd = os.open(self.path, os.O_RDONLY)  # kept open for random access; reopened after unpickling

  def _read_jsonl(self, index: int) -> tuple[Any, str]:
    where = f"{self.path}:{int(self._line_numbers[index])}"
    start, end = (int(v) for v in self._offsets[index])
    line = os.pread(self._fd, end - start, start)  # positional read: safe from several threads
    try:
      return json.loads(line), where
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return _ParseError(f"invalid JSON: {e}"), where

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fd"] = None  # file descriptors do not travel; each worker process reopens the file
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    if self._offsets is not None:
      self._fd = os.open(self.path, os.O_RDONLY)

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)

  # ---- random access ------------------------------------------------------------------------------
  def __len__(self) -> int:
    return len(self._entries) if self._entries is not None else len(self._offsets)

  def __getitem__(self, index: int) -> Record:
    n = len(self)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for {self.path} with {n} entries")
    if self._entries is not None:
      entry, where = self._entries[index], f"{self.path}[{index}]"
    else:
      entry, where = self._read_jsonl(index)
    return entry_to_record(
      entry,
      index=index,
      where=where,
      source=self.name,
      image_root=self.image_root,
      fallback_id=f"{self.path.stem}:{index}",
    )

  def __repr__(self) -> str:
    return f"LlavaSource({str(self.path)!r}, image_root={str(self.image_root)!r}, len={len(self)})"


class _ParseError:
  def __init__(self, detail: str):
    self.detail = detail


def entry_to_record(entry: Any, *, index: int, where: str, source: str, image_root: Path, fallback_id: str) -> Record:
  """Converts one LLaVA entry; problems become ``record["error"]`` (never an exception)."""
  sample_id = fallback_id
  if isinstance(entry, Mapping) and entry.get("id") is not None:
    sample_id = str(entry["id"])

  def bad(detail: str) -> Record:
    return {
      "id": sample_id,
      "source": source,
      "messages": [],
      "images": [],
      "error": {"reason": MALFORMED_CONVERSATION, "detail": f"{where}: {detail}"},
    }

  if isinstance(entry, _ParseError):
    return bad(entry.detail)
  if not isinstance(entry, Mapping):
    return bad(f"entry is a {type(entry).__name__}, expected an object")

  # images
  if "image" in entry and "images" in entry:
    return bad("has both 'image' and 'images'")
  raw_images = entry.get("images", entry.get("image"))
  if raw_images is None:
    raw_images = []
  elif isinstance(raw_images, str):
    raw_images = [raw_images]
  if not isinstance(raw_images, list) or not all(isinstance(p, str) and p for p in raw_images):
    return bad(f"images must be a path or a list of non-empty paths, found {raw_images!r:.80}")
  images = [str(image_root / p) for p in raw_images]  # an absolute p replaces the root

  # messages
  turns = entry.get("conversations")
  if not isinstance(turns, list):
    return bad(f"'conversations' must be a list, found {type(turns).__name__}")
  messages = []
  system = entry.get("system")
  if system is not None:
    if not isinstance(system, str):
      return bad(f"'system' must be a str, found {type(system).__name__}")
    messages.append({"role": "system", "content": system})
  for k, turn in enumerate(turns):
    if not isinstance(turn, Mapping):
      return bad(f"conversations[{k}] is a {type(turn).__name__}")
    speaker = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    role = ROLE_ALIASES.get(str(speaker).lower()) if speaker is not None else None
    if role is None:
      return bad(f"conversations[{k}] has unknown speaker {speaker!r}")
    if not isinstance(content, str):
      return bad(f"conversations[{k}] value is a {type(content).__name__}, expected str")
    messages.append({"role": role, "content": content})

  if len(images) == 1 and count_image_marks(messages) == 0:
    for m in messages:
      if m["role"] == "user":
        m["content"] = f"{IMAGE_MARK}\n{m['content']}"
        break
  return {"id": sample_id, "source": source, "messages": messages, "images": images}
