"""Where the converter writes: a temporary directory beside the target, renamed into place at the end.

A conversion that fails (bad input, a bug, Ctrl-C, SIGTERM) removes its temporary directory; one that
is killed outright (SIGKILL, power loss) leaves only a hidden `.NAME.convert-tmp-PID-XXXX` directory
beside the target. Either way nothing appears under the target name unless the conversion finished,
so a directory with the target's name is always complete.

Also here: the tokenizer / processor files that travel with a checkpoint in both directions, and the
progress bar.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from nvlm_jax.data.processor_setup import TOKENIZER_SUBDIR

TMP_MARKER = ".convert-tmp-"
PROVENANCE_FILE = "nvlm_convert.json"

# Files a Hugging Face checkpoint directory carries beside the weights that a user of the converted
# model needs (tokenizer, chat template, generation and image-processor settings).
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
  "generation_config.json",
  "preprocessor_config.json",
  "processor_config.json",
)


class ConvertError(ValueError):
  """A conversion that cannot be done as asked; the message names the file / key / setting."""


class OutputExistsError(ConvertError):
  pass


def _raise_on_sigterm(signum, frame):
  raise SystemExit(128 + signum)


def refuse_existing(target: str | os.PathLike) -> Path:
  """The absolute output path; OutputExistsError if something is there already (checked before any work)."""
  target = Path(target).absolute()
  if target.exists() or target.is_symlink():
    raise OutputExistsError(
      f"{target}: already exists; converting into an existing directory is refused "
      "(remove it or choose another output path)"
    )
  return target


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike) -> Iterator[Path]:
  """Yields an empty temporary directory beside `target`; renames it to `target` on success and
  removes it on any failure. Refuses a target that already exists."""
  target = refuse_existing(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARKER}{os.getpid()}-", dir=target.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any mkdir
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)  # run the cleanup below on `kill`
  try:
    yield tmp
    if target.exists():
      raise OutputExistsError(f"{target}: appeared while converting; the result is discarded")
    os.rename(tmp, target)
  except BaseException:
    _remove(tmp)
    raise
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _remove(directory: Path) -> None:
  for _ in range(3):  # a straggling writer thread may still add a file while the tree is removed
    shutil.rmtree(directory, ignore_errors=True)
    if not directory.exists():
      return


def copy_side_files(source: Path, dest: Path, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
  """Copies the tokenizer / processor files present in `source` (or, for a trainer workdir, in
  `source/tokenizer/`, which wins) into `dest`; returns their names."""

  copied = {}
  for directory in (Path(source), Path(source) / TOKENIZER_SUBDIR):
    for name in names:
      if (directory / name).is_file():
        shutil.copy2(directory / name, dest / name)
        copied[name] = True
  return sorted(copied)


class Progress:
  """tqdm bar over bytes with a tensor counter and ETA; silent when disabled."""

  def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool = True):
    self.total_tensors, self.tensors = total_tensors, 0
    self._bar = None
    if enabled:
      from tqdm import tqdm

      self._bar = tqdm(
        total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True, smoothing=0.05
      )
      self._bar.set_postfix_str(f"0/{total_tensors} tensors")

  def update(self, nbytes: int, tensors: int = 1) -> None:
    self.tensors += tensors
    if self._bar is not None:
      self._bar.update(nbytes)
      self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def parse_size(text: str | int) -> int:
  """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1234' -> 1234 (transformers' convention)."""
  if isinstance(text, int):
    return text
  units = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
  }
  s = str(text).strip().upper().replace(" ", "")
  number = s.rstrip("KMGTIB")
  unit = s[len(number) :]
  try:
    value = float(number)
  except ValueError:
    raise ConvertError(f"size {text!r}: expected a number with an optional unit such as 5GB or 500MiB") from None
  if unit not in units or value <= 0:
    raise ConvertError(f"size {text!r}: unknown unit {unit!r} (use B, KB, MB, GB, KiB, MiB, GiB)")
  return int(value * units[unit])
