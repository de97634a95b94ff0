"""The generation half of evaluation: checkpoint -> model + processor -> one answer per benchmark sample.

    model, params = models.load_model(checkpoint_dir)     # a HF checkpoint dir or one of our training dirs
    processor = load_processor(checkpoint_dir, model)
    rows = generate_answers(model, params, processor, BENCHMARKS["vqav2"], samples, batch_size=8)
    # rows[i] = {"id", "prediction", "num_prompt_tokens", "num_generated_tokens", "finished"}, in sample order

How a benchmark is run (what `eval.py` does, docs/paper.md (e)/(i)):
  * the prompt is `Benchmark.build_prompt(sample)`: the task's system prompt (Megatron's per-task
    ones) and the user text with its `<image>` marks and answer suffix; one user turn, then the
    generation prompt `<|im_start|>assistant\\n`;
  * decoding is greedy (Megatron `--top_k 1`), `max_new_tokens` defaults to the benchmark's, and an
    answer is the text before the first EOS, special tokens dropped, surrounding whitespace stripped;
  * samples are encoded once up front (in threads) to learn their prompt lengths, sorted longest
    first so that a batch holds prompts of similar length (little padding, and an out-of-memory shows
    up in the first batch, not the last), then re-encoded batch by batch (image tiles are large: only
    one batch of them is ever held, the next one prepared in a thread while the device generates);
  * prompts are left-padded to a multiple of `pad_to_multiple_of` and the last batch is filled up with
    copies, so one compiled program serves many batches.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_jax import models
from nvlm_jax.data.pipeline import check_processor_matches_model as check_sizes
from nvlm_jax.evaluation.benchmarks import Benchmark, images_for_prompt
from nvlm_jax.generation import generate, language_config
from nvlm_jax.processing.processor import Processor
from nvlm_jax.processing.tokenizer import ENDOFTEXT, UNKNOWN_TOKEN_TEXT, NvlmTokenizer
from nvlm_jax.sharding import LOGICAL_AXIS_RULES
from nvlm_jax.data import processor_setup

TOKENIZER_FILE = "tokenizer.json"


# ----------------------------------------------------------------------------------- loading


def is_training_checkpoint(path: str | os.PathLike) -> bool:
  return models.checkpoint_format(path) == models.OURS


def workdir_of(path: Path) -> Path:
  """The trainer workdir of a training checkpoint path (workdir, workdir/checkpoints or a step dir)."""
  path = path.absolute()
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return path.parent.parent
  if path.name == "checkpoints":
    return path.parent
  return path


def _tokenizer_dirs(path: Path) -> list[Path]:
  """Where a checkpoint's tokenizer may live: the dir itself; for training checkpoints also the
  workdir and its tokenizer/ (where the trainer saves it)."""
  path = path.absolute()
  candidates = [path]
  if is_training_checkpoint(path):
    workdir = workdir_of(path)
    candidates += [workdir, workdir / "tokenizer"]
  return list(dict.fromkeys(candidates))


def processor_settings_for_model(model_config, tokenizer) -> dict[str, Any]:
  """Processor arguments that make the image text line up with an NVLM model config."""
  vision = getattr(model_config, "vision", None)
  if vision is None:  # text-only model: image settings are never used
    return {}
  token = tokenizer.id_to_token(model_config.image_token_id)
  if token is None:
    raise ValueError(
      f"{tokenizer.source}: the model's image placeholder id {model_config.image_token_id} is "
      "not in the tokenizer's vocabulary; save the checkpoint with a tokenizer that has it"
    )
  return {
    "image_size": vision.image_size,
    "patch_size": vision.patch_size,
    "downsample_ratio": model_config.downsample_ratio,
    "max_tiles_per_image": model_config.max_tiles,
    "use_thumbnail": model_config.use_thumbnail,
    "image_context_token": token,
    "fusion": model_config.variant,
  }


def check_processor_matches_model(processor, model_config) -> None:
  """Raises if the processor's image text would not line up with the model (ids, tile size, tokens)."""
  if getattr(model_config, "vision", None) is None:
    return

  check_sizes(processor, model_config)
  if hasattr(processor, "model_token_ids"):
    wrong = {
      k: (v, getattr(model_config, k, None))
      for k, v in processor.model_token_ids().items()
      if tuple(np.atleast_1d(getattr(model_config, k, ()))) != tuple(np.atleast_1d(v))
    }
    if wrong:
      raise ValueError(
        "processor and model disagree on token ids (processor, model): "
        + ", ".join(f"{k} {p} vs {m}" for k, (p, m) in wrong.items())
      )


def load_processor(path: str | os.PathLike, model=None, *, tokenizer: str | os.PathLike | None = None):
  """The Processor for a checkpoint.

  * a training checkpoint whose workdir has the trainer's processor.json: exactly the processor the
    training run used (`data.processor_setup.read_run_processor`);
  * a dir holding tokenizer.json beside a HF config.json: `Processor.from_pretrained`;
  * otherwise the tokenizer found (in the dir, the workdir, workdir/tokenizer, or `tokenizer`) with
    the image settings of the model's config.

  `tokenizer` (a directory with tokenizer.json, a training workdir, or tokenizer.json itself) forces where the
  tokenizer comes from. With `model`, the
  processor is checked against it (placeholder and `<Image>` ids, tile size, tokens per tile).
  """

  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"load_processor({path}): the directory does not exist")
  model_config = getattr(model, "config", None)
  training = is_training_checkpoint(path)
  if tokenizer is None and training and (workdir_of(path) / "processor.json").is_file():
    processor = processor_setup.read_run_processor(workdir_of(path))
  else:
    # `tokenizer` takes what config.data.tokenizer takes: a dir with tokenizer.json or a training workdir
    candidates = [Path(tokenizer), Path(tokenizer) / "tokenizer"] if tokenizer is not None else _tokenizer_dirs(path)
    found = next(
      (c for c in candidates if (c / TOKENIZER_FILE).is_file() or (c.is_file() and c.suffix == ".json")), None
    )
    if found is None:
      raise FileNotFoundError(
        f"no {TOKENIZER_FILE} for checkpoint {path} (looked in "
        f"{', '.join(str(c) for c in candidates)}); pass --tokenizer DIR"
      )
    if found.is_dir() and (found / "config.json").is_file() and not training:
      processor = Processor.from_pretrained(found)
    else:
      tok = NvlmTokenizer.from_pretrained(found)
      processor = Processor(tok, **processor_settings_for_model(model_config, tok))
  if model_config is not None:
    check_processor_matches_model(processor, model_config)
  return processor


@contextlib.contextmanager
def mesh_context(mesh):
  """Trace under `mesh` and the logical-axis rules (sharded generation); nothing when mesh is None."""
  if mesh is None:
    yield
    return
  import flax.linen as nn
  import jax

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def eos_ids(model, processor) -> tuple[int, ...]:
  """Generation stops at the model config's EOS ids, the tokenizer's EOS (`<|im_end|>`) and
  `<|endoftext|>` (Qwen2's generation_config stops at both)."""

  eos = language_config(model).eos_token_id
  ids = list(eos) if isinstance(eos, (tuple, list)) else ([] if eos is None else [eos])
  tokenizer = processor.tokenizer
  extra = [tokenizer.eos_id] + ([tokenizer.token_to_id(ENDOFTEXT)] if tokenizer.has_token(ENDOFTEXT) else [])
  ids += [i for i in extra if i not in ids]
  return tuple(int(i) for i in ids)


def is_multimodal(model) -> bool:
  return getattr(getattr(model, "config", None), "vision", None) is not None


# ----------------------------------------------------------------------------------- prompts


def prompt_messages(benchmark: Benchmark, sample: Mapping[str, Any]) -> tuple[list[dict], list[str], str | None]:
  """(messages, image paths, system prompt) of one sample: one user turn built by the benchmark."""
  system, user = benchmark.build_prompt(sample)
  return [{"role": "user", "content": user}], images_for_prompt(sample, user), system or None


class PromptError(ValueError):
  """A sample's prompt cannot be built or encoded (unreadable image, image count, ...)."""


def encode_prompt(processor, benchmark: Benchmark, sample: Mapping[str, Any], index: int | None = None):
  """The ProcessedSample of a sample's generation prompt; errors name the benchmark and sample id."""
  try:
    messages, images, system = prompt_messages(benchmark, sample)
    return processor.encode_sample(
      messages, images, add_generation_prompt=True, system_prompt=system, sample_index=index
    )
  except (ValueError, KeyError, OSError) as err:
    raise PromptError(f"{benchmark.name} sample {sample.get('id')!r}: {err}") from err


# ----------------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class Answer:
  text: str
  num_generated_tokens: int
  finished: bool  # an EOS was produced (False: cut at max_new_tokens)


def decode_answer(tokens: Sequence[int], tokenizer, stop_ids: Sequence[int]) -> Answer:
  """The text before the first stop id, special tokens dropped, whitespace stripped. An id past the
  tokenizer (a padded embedding row) reads as U+FFFD: the answer scores wrong instead of ending the run."""
  tokens = [int(t) for t in tokens]
  stops = {int(s) for s in stop_ids}
  end = next((k for k, t in enumerate(tokens) if t in stops), None)
  kept = tokens if end is None else tokens[:end]
  return Answer(
    tokenizer.decode(kept, skip_special_tokens=True, unknown=UNKNOWN_TOKEN_TEXT).strip(), len(kept), end is not None
  )


def sort_by_length(lengths: Sequence[int]) -> list[int]:
  """Sample indices, longest prompt first (ties keep file order)."""
  return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def batches_of(order: Sequence[int], batch_size: int) -> list[list[int]]:
  return [list(order[k : k + batch_size]) for k in range(0, len(order), batch_size)]


def _map_threads(fn: Callable, items: Sequence, workers: int) -> list:
  if workers <= 1 or len(items) <= 1:
    return [fn(item) for item in items]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(fn, items))


def generate_answers(
  model,
  params,
  processor,
  benchmark: Benchmark,
  samples: Sequence[Mapping[str, Any]],
  *,
  batch_size: int = 8,
  max_new_tokens: int | None = None,
  pad_to_multiple_of: int = 128,
  workers: int | None = None,
  progress: bool = True,
) -> list[dict[str, Any]]:
  """One greedy answer per sample: rows {"id", "prediction", "num_prompt_tokens",
  "num_generated_tokens", "finished"} in the samples' order (see the module docstring).

  workers: threads that decode and tile images (default: up to 8).
  """

  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  max_new_tokens = int(max_new_tokens or benchmark.max_new_tokens)
  workers = workers if workers is not None else min(8, os.cpu_count() or 1)
  multimodal = is_multimodal(model)
  stop_ids = eos_ids(model, processor)
  pad_id = processor.tokenizer.pad_id

  def encode(i: int):
    return encode_prompt(processor, benchmark, samples[i], i)

  def lengths_of(i: int) -> tuple[int, int]:
    encoded = encode(i)
    return int(encoded.input_ids.shape[0]), encoded.num_tiles

  measured = _map_threads(lengths_of, range(len(samples)), workers)
  lengths = [n for n, _ in measured]
  if not multimodal:
    with_images = [samples[i]["id"] for i, (_, tiles) in enumerate(measured) if tiles]
    if with_images:
      raise ValueError(
        f"{benchmark.name}: the model is text-only but {len(with_images)} prompt(s) show "
        f"images, e.g. sample {with_images[0]!r}"
      )
  batches = batches_of(sort_by_length(lengths), batch_size)

  def prepare(batch: list[int]) -> dict[str, np.ndarray]:
    rows = batch + [batch[0]] * (batch_size - len(batch))  # fill the last batch: same shapes, no recompile
    encoded = _map_threads(encode, rows, min(workers, len(rows)))
    arrays = processor.collate(encoded, padding_side="left")
    if not multimodal or not arrays["tile_mask"].any():
      arrays.pop("pixel_values"), arrays.pop("tile_mask")
    return arrays

  results: list[dict[str, Any] | None] = [None] * len(samples)
  bar = _progress_bar(len(samples), benchmark.name, progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as prefetch:
    upcoming = prefetch.submit(prepare, batches[0]) if batches else None
    for k, batch in enumerate(batches):
      arrays = upcoming.result()
      upcoming = prefetch.submit(prepare, batches[k + 1]) if k + 1 < len(batches) else None
      started = time.perf_counter()
      tokens = generate(
        model,
        params,
        arrays["input_ids"],
        attention_mask=arrays["attention_mask"],
        pixel_values=arrays.get("pixel_values"),
        tile_mask=arrays.get("tile_mask"),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        pad_to_multiple_of=pad_to_multiple_of,
      )
      tokens = np.asarray(tokens)
      elapsed = time.perf_counter() - started
      for row, i in enumerate(batch):
        answer = decode_answer(tokens[row], processor.tokenizer, stop_ids)
        results[i] = {
          "id": samples[i]["id"],
          "prediction": answer.text,
          "num_prompt_tokens": lengths[i],
          "num_generated_tokens": answer.num_generated_tokens,
          "finished": answer.finished,
        }
      bar.update(len(batch))
      bar.set_postfix(batch_s=f"{elapsed:.2f}", prompt=max(lengths[i] for i in batch), refresh=False)
  bar.close()
  return results  # type: ignore[return-value]


def _progress_bar(total: int, name: str, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=f"{name}", unit="sample", disable=not enabled, dynamic_ncols=True)
