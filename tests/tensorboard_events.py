"""Reads a TensorBoard run back as TensorBoard shows it: every event file in name order, each record's CRC
checked (tensorboardX's masked CRC-32C), START session logs applied (earlier events at steps >= the marker's step are
hidden). tensorboard itself is not installed; the Event proto is tensorboardX's."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c as _masked


def read_events(path: Path) -> list[Event]:
  """The events of one file; a torn last record (a kill mid-write) is dropped, as TensorBoard's reader does."""
  data, pos, events = Path(path).read_bytes(), 0, []
  while pos + 12 <= len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == _masked(header), f"{path}: bad length CRC at {pos}"
    if pos + 16 + length > len(data):
      break
    payload = data[pos + 12 : pos + 12 + length]
    assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == _masked(payload), f"{path}: {pos}"
    events.append(Event.FromString(payload))
    pos += 16 + length
  return events


def event_files(logdir: Path) -> list[Path]:
  return sorted(Path(logdir).glob("events.out.tfevents.*"), key=lambda p: p.name)


def purge_steps(logdir: Path) -> list[list[int]]:
  """Per event file, the steps of its START session logs."""
  return [
    [e.step for e in read_events(f) if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    for f in event_files(logdir)
  ]


def shown_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
  """(step, value) of `tag` as TensorBoard shows the run: a START at step s hides what came before at steps >= s."""
  shown: list[tuple[int, float]] = []
  for f in event_files(logdir):
    for event in read_events(f):
      if event.HasField("session_log") and event.session_log.status == SessionLog.START:
        shown = [(step, value) for step, value in shown if step < event.step]
      for value in event.summary.value:
        if value.tag == tag:
          shown.append((event.step, value.simple_value))
  return sorted(shown)
