"""A dependency-free TensorBoard event-file writer for scalar metrics.

TensorBoard reads `events.out.tfevents.*` files: a sequence of TFRecord records, each holding one
serialized `tensorflow.Event` protobuf. We only need scalars, so both layers are written by hand:

  record  = uint64 length | uint32 masked_crc32c(length) | payload | uint32 masked_crc32c(payload)
  Event   = 1: wall_time (double) | 2: step (int64) | 3: file_version (string) | 5: summary | 7: session_log
  Summary = 1: repeated Value ; Value = 1: tag (string) | 2: simple_value (float)
  SessionLog = 1: status (enum, START = 1)

A START session log written at step s tells TensorBoard to discard events with step >= s from earlier
runs of the same job. After resuming from a checkpoint the trainer also cuts the old event files to the
restored step (`truncate_event_files`), so the files themselves hold every step once.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE = []
for _n in range(256):
  _c = _n
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # Castagnoli polynomial, reflected
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(
  step: int,
  wall_time: float,
  *,
  scalars: dict[str, float] | None = None,
  file_version: str | None = None,
  session_start: bool = False,
) -> bytes:
  """One serialized tensorflow.Event."""
  out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
      _length_delimited(1, _length_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(v)))
      for tag, v in scalars.items()
    )
    out += _length_delimited(5, values)
  if session_start:
    out += _length_delimited(7, _key(1, 0) + _varint(1))
  return out


def encode_record(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def read_records(path: str, *, allow_torn_tail: bool = False) -> list[bytes]:
  """The payloads of a TFRecord file, checking every CRC. `allow_torn_tail`: a last record cut short (a
  kill mid-write) is dropped instead of raising."""
  payloads = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    if allow_torn_tail and pos + 16 > len(data):
      break
    length_bytes = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", length_bytes)
    (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    if length_crc != masked_crc32c(length_bytes):
      raise ValueError(f"{path}: corrupt record length at byte {pos}")
    if allow_torn_tail and pos + 16 + length > len(data):
      break
    payload = data[pos + 12 : pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
    if payload_crc != masked_crc32c(payload):
      raise ValueError(f"{path}: corrupt record payload at byte {pos}")
    payloads.append(payload)
    pos += 16 + length
  return payloads


def event_step(payload: bytes) -> int:
  """The step (field 2) of a serialized Event; 0 if absent."""
  pos = 0
  while pos < len(payload):
    key, pos = _read_varint(payload, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(payload, pos)
      if field == 2:
        return value - (1 << 64) if value >= 1 << 63 else value
    elif wire == 1:
      pos += 8
    elif wire == 5:
      pos += 4
    elif wire == 2:
      length, pos = _read_varint(payload, pos)
      pos += length
    else:
      raise ValueError(f"unexpected protobuf wire type {wire}")
  return 0


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, pos
    shift += 7


def truncate_event_files(logdir: str, last_step: int) -> str:
  """Cuts every event file in `logdir` to the events of steps <= last_step (and drops a torn last record).
  Returns what it did ("" if nothing)."""
  if not os.path.isdir(logdir):
    return ""
  changed = 0
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events.out.tfevents."):
      continue
    path = os.path.join(logdir, name)
    with open(path, "rb") as f:
      size = len(f.read())
    kept = [p for p in read_records(path, allow_torn_tail=True) if event_step(p) <= last_step]
    data = b"".join(encode_record(p) for p in kept)
    if len(data) != size:
      with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(path + ".tmp", path)
      changed += 1
  return f"{logdir}: cut {changed} event file(s) to step {last_step}" if changed else ""


class EventWriter:
  """Appends scalar summaries to a new events file in `logdir` (one file per writer, as TensorBoard expects)."""

  def __init__(self, logdir: str, *, resume_step: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(encode_record(encode_event(0, time.time(), file_version="brain.Event:2")))
    if resume_step is not None:
      self._file.write(encode_record(encode_event(resume_step, time.time(), session_start=True)))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._file.write(encode_record(encode_event(step, time.time(), scalars=values)))

  def flush(self, durable: bool = False) -> None:
    self._file.flush()
    if durable:
      os.fsync(self._file.fileno())

  def close(self) -> None:
    if not self._file.closed:
      self._file.flush()
      self._file.close()
