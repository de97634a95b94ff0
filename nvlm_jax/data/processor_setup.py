"""The Processor (tokenizer + image settings) the data pipeline needs, built from the training config.

  data.tokenizer   "tiny_synthetic": train the tiny demo BPE tokenizer offline on the synthetic corpus;
                   otherwise a directory (or file) with tokenizer.json, e.g. the imported HF checkpoint,
                   or one of our training workdirs; "" = the one of checkpoint.init_from
  data.processor   Processor keyword arguments overriding the ones derived from the model config
                   (image_size, patch_size, downsample_ratio, max_tiles_per_image, use_thumbnail, fusion),
                   e.g. {"use_tiling": False} for the single-tile pretraining stages

The model config then takes the token ids the processor dictates (`sync_model_config`: the image
placeholder id, and for NVLM-X/H the ids of `<Image>`), so a config never has to hard-code them.
The tokenizer and the processor arguments are saved into the workdir (WORKDIR/tokenizer/, WORKDIR/
processor.json): a resumed run reuses exactly that tokenizer, and evaluation rebuilds the processor with
`read_run_processor(workdir)` (behind `nvlm_jax.load_processor`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nvlm_jax.data.synthetic import corpus_texts
from nvlm_jax.processing.processor import Processor
from nvlm_jax.processing.tokenizer import NvlmTokenizer, build_tiny_tokenizer

TINY_TOKENIZER = "tiny_synthetic"
TOKENIZER_SUBDIR = "tokenizer"
PROCESSOR_FILE = "processor.json"


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else dict(value or {})


def processor_kwargs(data_config, model_config) -> dict[str, Any]:
  """Processor arguments that make its image text line up with `model_config` (+ data.processor overrides)."""
  kwargs: dict[str, Any] = {}
  vision = getattr(model_config, "vision", None)
  if vision is not None:
    kwargs.update(
      image_size=vision.image_size,
      patch_size=vision.patch_size,
      downsample_ratio=model_config.downsample_ratio,
      max_tiles_per_image=model_config.max_tiles,
      use_thumbnail=model_config.use_thumbnail,
      fusion=model_config.variant,
    )
  kwargs.update(_plain(data_config.get("processor", None)))
  return kwargs


def build_tokenizer(spec: str, *, max_tiles: int = 6, vocab_size: int = 512, bos_token: str | None = None):
  """bos_token: a BOS for the tiny tokenizer (which has none), for prompt formats that need one."""
  if spec == TINY_TOKENIZER:
    tiny = build_tiny_tokenizer(corpus_texts(500, max_tiles=max(max_tiles, 6)), vocab_size=vocab_size)
    if bos_token is None:
      return tiny
    return NvlmTokenizer(
      tiny.backend, eos_token=tiny.eos_token, pad_token=tiny.pad_token, bos_token=bos_token, source=tiny.source
    )
  if not spec:
    raise ValueError(
      f"config.data.tokenizer is empty (and no checkpoint.init_from to take it from): give a "
      f"directory with tokenizer.json or {TINY_TOKENIZER!r}"
    )
  if (Path(spec) / TOKENIZER_SUBDIR / "tokenizer.json").is_file():  # one of our training workdirs
    spec = str(Path(spec) / TOKENIZER_SUBDIR)
  return NvlmTokenizer.from_pretrained(spec)


def build_processor(
  data_config, model_config, workdir: str | os.PathLike | None = None, *, default_tokenizer: str = ""
):
  """(processor, kwargs). A tokenizer already saved in `workdir` (a resumed run) wins over data.tokenizer;
  an empty data.tokenizer means `default_tokenizer` (the trainer passes checkpoint.init_from)."""
  kwargs = processor_kwargs(data_config, model_config)
  saved = None if workdir is None else Path(workdir) / TOKENIZER_SUBDIR
  if saved is not None and (saved / "tokenizer.json").is_file():
    tokenizer = NvlmTokenizer.from_pretrained(saved)
  else:
    tokenizer = build_tokenizer(
      data_config.get("tokenizer", "") or default_tokenizer,
      max_tiles=kwargs.get("max_tiles_per_image", 6),
      vocab_size=data_config.get("tokenizer_vocab_size", 512),
      bos_token=data_config.get("tokenizer_bos_token", None),
    )
  llm = getattr(model_config, "llm", model_config)
  if tokenizer.vocab_size > llm.vocab_size:
    raise ValueError(
      f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's "
      f"llm.vocab_size is {llm.vocab_size}; set config.model.overrides.llm.vocab_size"
    )
  return Processor(tokenizer, **kwargs), kwargs


def sync_model_config(model_config, processor):
  """The model config with the token ids that must agree with the processor's tokenizer
  (`Processor.model_token_ids()`: the image placeholder id, and `<Image>`'s ids for NVLM-X/H)."""
  import dataclasses

  if not dataclasses.is_dataclass(model_config) or not hasattr(model_config, "image_token_id"):
    return model_config
  changes = {k: v for k, v in processor.model_token_ids().items() if getattr(model_config, k, None) != v}
  if changes:
    from absl import logging

    logging.info("model config token ids set from the processor's tokenizer: %s", changes)
    model_config = dataclasses.replace(model_config, **changes)
  return model_config


def save_processor(workdir: str | os.PathLike, processor, kwargs: dict) -> None:
  """Writes WORKDIR/tokenizer/ and WORKDIR/processor.json (process 0 only)."""
  import jax

  if jax.process_index() != 0:
    return
  workdir = Path(workdir)
  if not (workdir / TOKENIZER_SUBDIR / "tokenizer.json").is_file():
    processor.tokenizer.save_pretrained(workdir / TOKENIZER_SUBDIR)
  (workdir / PROCESSOR_FILE).write_text(json.dumps({"tokenizer": TOKENIZER_SUBDIR, **kwargs}, indent=2) + "\n")


def read_run_processor(workdir: str | os.PathLike):
  """The Processor a training run used (WORKDIR/processor.json + WORKDIR/tokenizer/); `nvlm_jax.load_processor`
  takes any checkpoint and comes here for a training workdir."""
  workdir = Path(workdir)
  settings_file = workdir / PROCESSOR_FILE
  if not settings_file.is_file():
    where = "does not exist" if not workdir.exists() else f"has no {PROCESSOR_FILE}"
    raise FileNotFoundError(
      f"load_processor({workdir}): the directory {where}; expected a training workdir of "
      f"the data pipeline ({PROCESSOR_FILE} + {TOKENIZER_SUBDIR}/). For a Hugging Face "
      "directory use nvlm_jax.Processor.from_pretrained"
    )
  try:
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ValueError(f"{settings_file}: unreadable processor settings ({e})") from None
  tokenizer = NvlmTokenizer.from_pretrained(workdir / settings.pop("tokenizer"))
  return Processor(tokenizer, **settings)
