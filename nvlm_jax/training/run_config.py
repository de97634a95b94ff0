"""The training config a workdir was trained with, recorded in WORKDIR/train_config.json.

Evaluation rebuilds from it what depends on the run's data: the synthetic benchmark
(nvlm_jax/evaluation/synthetic.py) draws its held-out samples with the run's size preset, tile settings and
text-only fraction, and refuses a seed the run trained on. The trainer rewrites the file each time a run starts
(process 0), so a resumed run with changed settings records the new ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TRAIN_CONFIG_FILE = "train_config.json"


def save_train_config(workdir: str | os.PathLike, config) -> None:
  """Writes `config` (an ml_collections ConfigDict or a plain dict) as JSON; values JSON cannot hold become strings."""
  data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  path = Path(workdir) / TRAIN_CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
  tmp.replace(path)


def read_train_config(workdir: str | os.PathLike) -> dict[str, Any]:
  """The config saved by `save_train_config`; FileNotFoundError naming the file if the run recorded none."""
  path = Path(workdir) / TRAIN_CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} does not exist: {workdir} is not a training workdir, or its run predates the recorded config"
    )
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ValueError(f"{path}: unreadable training config ({e})") from None
