"""Runs a study: every (seed, arm) trained in this process, asked the held-out questions, summarised.

Layout under OUT:

    OUT/STUDY/runs/ARM/seed_S/        the run's training workdir (checkpoints: an interrupted run resumes)
    OUT/STUDY/runs/ARM/seed_S.json    the run's result, written atomically once it is complete
    OUT/STUDY/results.json, STUDY.png the study's summary (report.py), rewritten after every run
    OUT/text_pretrain/steps_N/seed_S/(.json)  the text-pretrained NVLM-X of x_frozen_llm and text_retention,
                                      one per seed and --steps
    OUT/jax_cache/                    compiled programs, reused by the next seed of an arm (compilation_cache)

Rerunning a study skips every run with a result file and resumes unfinished training from its newest
checkpoint (the trainer's own resume). Runs go seed by seed (all arms of seed 0 first), so an interrupted
study already compares every arm. A run that fails is reported with its arm and seed and the others go on.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from nvlm_jax import models
from nvlm_jax.data import pipeline
from nvlm_jax.evaluation import synthetic
from nvlm_jax.studies import report
from nvlm_jax.studies.definitions import (
  TEXT_STAGE,
  Arm,
  Study,
  arm_recipe,
  base_recipe,
  eval_source,
  get_study,
  text_stage_recipe,
)
from nvlm_jax.training import metrics as metrics_lib
from nvlm_jax.training.trainer import Trainer, make_processor

DECODER_LENGTH_SAMPLES = 256  # training examples encoded to measure the decoder's tokens per sample


def write_json_atomic(path: Path, value) -> None:
  """A reader sees the old file or the whole new one, never a torn one (a killed study must not leave a
  result that looks finished)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(value, indent=2) + "\n")
  os.replace(tmp, path)


class _PrefixedLines(io.TextIOBase):
  """stdout with every line prefixed (the trainer's step / loss / ETA lines then say which run they are)."""

  def __init__(self, stream, prefix: str):
    self.stream, self.prefix, self.at_line_start = stream, prefix, True

  def write(self, text: str) -> int:
    for piece in text.splitlines(keepends=True):
      if self.at_line_start:
        self.stream.write(self.prefix)
      self.stream.write(piece)
      self.at_line_start = piece.endswith("\n")
    return len(text)

  def flush(self) -> None:
    self.stream.flush()


@contextlib.contextmanager
def compilation_cache(directory: Path):
  """JAX's persistent compilation cache in `directory` while a study runs: every seed of an arm compiles the
  same init and train step (the seed is an argument, not a constant), so only the first seed pays for it
  (measured: 6 s -> 1 s for the tiny D step). A cache the user configured already is left as it is; ours is
  switched off again afterwards (JAX builds its cache once: reset_cache makes it read the setting again)."""
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax_compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
    jax_compilation_cache.reset_cache()


def train_in_process(config, prefix: str) -> None:
  """Trains (or resumes) `config` in this process; its progress lines carry `prefix`."""
  with contextlib.redirect_stdout(_PrefixedLines(sys.stdout, prefix)):
    Trainer(config).run()


def training_speed(workdir: Path, skip_steps: int) -> dict:
  """Samples/s and final loss from WORKDIR/metrics.jsonl (every row, also those of a run that was resumed).
  The first `skip_steps` rows are left out of the speed: their window holds the first, slower steps."""
  rows = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    if line.strip():
      rows.append(json.loads(line))
  if not rows:
    raise ValueError(f"{workdir}/metrics.jsonl has no rows")
  steady = [r for r in rows if r["step"] > skip_steps] or rows
  return {
    "samples_per_s": float(np.median([r["samples_per_s"] for r in steady])),
    "step_time_s": float(np.median([r["step_time_s"] for r in steady])),
    "final_loss": float(rows[-1]["loss"]),
  }


def decoder_length(config, num_samples: int = DECODER_LENGTH_SAMPLES) -> dict:
  """Mean decoder tokens per training sample (before packing) with this recipe's processor, and the share of
  samples that lost tiles to fit data.seq_len (the pipeline's tile degradation)."""
  processor = make_processor(config, models.model_config_from_settings(config.model))[0]
  _, _, seq_len, max_tiles = pipeline.resolve_shapes(config.data, processor)
  examples = pipeline.make_example_dataset(
    config.data, processor, seq_len=seq_len, max_tiles=max_tiles, seed=config.seed
  )
  lengths, degraded = [], 0
  for k in range(num_samples):
    example = examples[k]
    if example["skip"]:
      continue
    lengths.append(len(example["input_ids"]))
    degraded += bool(example["degraded"])
  if not lengths:
    raise ValueError(f"none of the first {num_samples} training samples encodes under this recipe")
  return {"decoder_tokens_per_sample": float(np.mean(lengths)), "degraded_fraction": degraded / len(lengths)}


def evaluate(workdir: Path, *, num_samples: int, source: dict) -> dict:
  """The synthetic benchmark's held-out accuracy (overall and per question type) of a training workdir."""
  return synthetic.evaluate_checkpoint(str(workdir), num_samples=num_samples, source=source)


class StudyRunner:
  def __init__(
    self,
    study: Study | str,
    out: str | os.PathLike,
    *,
    seeds: int = 3,
    steps: int | None = None,
    eval_samples: int | None = None,
    arms: list[str] | None = None,
    config_hook: Callable | None = None,
    say: Callable[[str], None] = metrics_lib.log_progress,
  ):
    """`config_hook(config)`: applied to every recipe (e.g. compiler options in tests); `arms`: a subset."""
    self.study = get_study(study) if isinstance(study, str) else study
    if seeds < 1:
      raise ValueError(f"--seeds must be >= 1, got {seeds}")
    self.out = Path(out).resolve()
    self.dir = self.out / self.study.name
    self.seeds = list(range(seeds))
    self.steps = int(self.study.default_steps if steps is None else steps)
    self.eval_samples = int(self.study.default_eval_samples if eval_samples is None else eval_samples)
    if self.steps < 1 or self.eval_samples < 1:
      raise ValueError(f"--steps and --eval-samples must be >= 1, got {self.steps}, {self.eval_samples}")
    self.arms = [self.study.arm(a) for a in arms] if arms else list(self.study.arms)
    self.config_hook = config_hook
    self.say = say
    self.source = eval_source(base_recipe(self.study, steps=self.steps))

  def result_path(self, arm: Arm, seed: int) -> Path:
    return self.dir / "runs" / arm.name / f"seed_{seed}.json"

  def _recipe(self, config):
    if self.config_hook is not None:
      self.config_hook(config)
    return config

  def check_finished_runs(self) -> None:
    """Refuses an OUT whose finished runs were made with another --steps or --eval-samples: skipping them
    would mix two settings in one table."""
    other = []
    for path in sorted((self.dir / "runs").glob("*/seed_*.json")):
      result = json.loads(path.read_text())
      if (result.get("steps"), result.get("eval_samples")) != (self.steps, self.eval_samples):
        other.append(f"{path} (--steps {result.get('steps')}, --eval-samples {result.get('eval_samples')})")
    if other:
      raise ValueError(
        f"{self.dir} holds runs made with other settings than --steps {self.steps} --eval-samples "
        f"{self.eval_samples}: {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}. Rerun with those "
        "settings to resume them, or give another --out"
      )

  def run(self) -> dict:
    """Every (seed, arm) not yet finished; returns the summary (also written to OUT/STUDY/results.json)."""
    self.check_finished_runs()
    with compilation_cache(self.out / "jax_cache"):
      return self._run_all()

  def _run_all(self) -> dict:
    plan = [(seed, arm) for seed in self.seeds for arm in self.arms]
    failures, walls = [], []
    start = time.perf_counter()
    for k, (seed, arm) in enumerate(plan, 1):
      tag = f"[{self.study.name} run {k}/{len(plan)} {arm.name} seed {seed}]"
      if self.result_path(arm, seed).is_file():
        self.say(f"{tag} done already: {self.result_path(arm, seed)}")
        continue
      left = len(plan) - k + 1
      eta = f", study ETA {metrics_lib.format_duration(np.mean(walls) * left)}" if walls else ""
      self.say(f"{tag} starting: {self.steps} steps, {self.eval_samples} held-out samples{eta}")
      t0 = time.perf_counter()
      try:
        result = self._run_one(arm, seed, tag)
      except Exception as e:  # one failed run must not lose the others: report it and go on
        failures.append({"arm": arm.name, "seed": seed, "error": f"{type(e).__name__}: {e}"})
        self.say(f"{tag} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        continue
      walls.append(time.perf_counter() - t0)
      write_json_atomic(self.result_path(arm, seed), result)
      self.say(f"{tag} accuracy {result['accuracy']:.3f} in {walls[-1]:.0f}s")
      self._write_summary(failures)
    summary = self._write_summary(failures)
    self.say(
      f"[{self.study.name}] {len(plan) - len(failures)}/{len(plan)} runs complete in "
      f"{metrics_lib.format_duration(time.perf_counter() - start)}: {self.dir / 'results.json'}, "
      f"{self.dir / (self.study.name + '.png')}"
    )
    return summary

  def _write_summary(self, failures: list[dict]) -> dict:
    runs = {}
    for arm in self.arms:
      runs[arm.name] = [
        json.loads(self.result_path(arm, s).read_text()) for s in self.seeds if self.result_path(arm, s).is_file()
      ]
    summary = report.summarize(self.study, runs, failures=failures, steps=self.steps, eval_samples=self.eval_samples)
    summary["eval_source"] = self.source
    write_json_atomic(self.dir / "results.json", summary)
    if any(runs.values()):
      report.plot(self.study, summary, self.dir / f"{self.study.name}.png")
      (self.dir / f"{self.study.name}.md").write_text(report.markdown_table(self.study, summary))
    return summary

  def _run_one(self, arm: Arm, seed: int, tag: str) -> dict:
    init_from = ""
    if self.study.from_text_stage:
      stage = self.text_stage(seed, tag)
      if not arm.train:
        return {**stage, "study": self.study.name, "arm": arm.name, "eval_samples": self.eval_samples}
      init_from = stage["workdir"]
    workdir = self.result_path(arm, seed).with_suffix("")
    config = self._recipe(
      arm_recipe(self.study, arm, steps=self.steps, seed=seed, workdir=str(workdir), init_from=init_from)
    )
    return {"study": self.study.name, "arm": arm.name, **self._train_and_evaluate(config, workdir, seed, tag)}

  def text_stage(self, seed: int, tag: str) -> dict:
    """The seed's text-pretrained NVLM-X, trained for the study's --steps (trained once, shared by the studies
    that start from it when they run with the same --steps)."""
    workdir = self.out / TEXT_STAGE / f"steps_{self.steps}" / f"seed_{seed}"
    done = workdir.with_suffix(".json")
    if done.is_file():
      return json.loads(done.read_text())
    self.say(f"{tag} text-only first stage ({self.steps} steps): {workdir}")
    config = self._recipe(text_stage_recipe(steps=self.steps, seed=seed, workdir=str(workdir)))
    result = {"stage": TEXT_STAGE, **self._train_and_evaluate(config, workdir, seed, f"{tag}[{TEXT_STAGE}] ")}
    write_json_atomic(done, result)
    return result

  def _train_and_evaluate(self, config, workdir: Path, seed: int, tag: str) -> dict:
    t0 = time.perf_counter()
    train_in_process(config, f"{tag.rstrip()} ")
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = evaluate(workdir, num_samples=self.eval_samples, source=self.source)
    eval_s = time.perf_counter() - t0
    return {
      "seed": seed,
      "workdir": str(workdir),
      "steps": int(config.total_steps),
      "eval_samples": self.eval_samples,
      "accuracy": float(scores["accuracy"]),
      "per_type": {t: float(v["accuracy"]) for t, v in scores["per_type"].items()},
      "per_type_count": {t: int(v["count"]) for t, v in scores["per_type"].items()},
      "num_questions": int(scores["num_questions"]),
      "eval_seed": scores.get("seed"),
      **training_speed(workdir, skip_steps=int(config.log.every_steps)),
      **decoder_length(config),
      "train_wall_s": train_s,
      "eval_wall_s": eval_s,
      "recipe": json.loads(config.to_json_best_effort()),
    }
