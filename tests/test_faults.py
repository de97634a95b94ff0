"""Faults in training: damaged checkpoints, torn logs, non-finite updates, bad settings.

One tiny text-only run of TOTAL steps (checkpoints every EVERY steps) is trained once per module; each
test copies its workdir, injects one fault, reruns the trainer in-process and asserts the exact outcome:
metrics bit-identical to the uninterrupted run (every step exactly once), or the named error. Killing a
real train.py at each phase of a checkpoint save is in test_training_resume.py (slow).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
import tensorboard_events
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import RecordWriter

from nvlm_jax import models
from nvlm_jax.checkpoint import orbax_checkpoint
from nvlm_jax.training import checkpointing, config_base, trainer
from nvlm_jax.training import metrics as metrics_lib
from nvlm_jax.training.synthetic_lm import SyntheticLMSpec, make_row

REPO = Path(__file__).resolve().parents[1]
TOTAL, EVERY, VOCAB, SEQ, BATCH = 6, 2, 128, 32, 8


def fault_config(workdir, **changes):
  c = config_base.base_config()
  c.workdir = str(workdir)
  c.model.decoder = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 64,
    "rope_theta": 10_000.0,
  }
  c.model.dtype = "float32"
  c.optimizer.update(lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.01, grad_clip=1.0)
  c.data.update(kind="synthetic_lm", global_batch_size=BATCH, seq_len=SEQ, num_microbatches=1)
  c.total_steps = TOTAL
  c.checkpoint.update(every_steps=EVERY, max_to_keep=10)
  c.log.update(every_steps=1, tensorboard=True)
  c.compiler_options = {"xla_backend_optimization_level": 0}
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  for key, value in changes.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def train(workdir, data_iterator=None, **changes):
  config = fault_config(workdir, **changes)
  return trainer.Trainer(config, devices=jax.devices()[:1], data_iterator=data_iterator).run()


def logged(workdir) -> dict[int, tuple]:
  """step -> (loss, grad_norm, learning_rate); asserts every step appears exactly once, in order."""
  rows = metrics_lib.read_metrics(str(workdir))
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"metrics.jsonl is not one clean run: {steps}"
  return {r["step"]: (r["loss"], r["grad_norm"], r["learning_rate"]) for r in rows}


def event_steps(workdir) -> list[int]:
  """The steps of train/loss as TensorBoard shows the run (all files, START markers applied); each shown value
  is the loss metrics.jsonl holds for its step."""
  shown = tensorboard_events.shown_scalars(Path(workdir) / "tensorboard", "train/loss")
  losses = {step: row[0] for step, row in logged(workdir).items()}
  for step, value in shown:
    assert value == pytest.approx(losses[step], rel=1e-6), (step, value, losses[step])
  return [step for step, _ in shown]


def final_params(workdir):
  return jax.device_get(models.load_checkpoint(workdir, step=TOTAL)[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A finished, uninterrupted run: its workdir, metrics and final parameters."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  train(workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert steps == [1, 2, 4, 6], steps  # orbax also saves the first step of a fresh run
  return {"workdir": workdir, "metrics": logged(workdir), "params": final_params(workdir)}


def copy_run(reference, tmp_path) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  return workdir


def largest_file(directory: Path) -> Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: Path) -> None:
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


def flip_bytes(path: Path, count: int = 64) -> None:
  data = bytearray(path.read_bytes())
  start = len(data) // 2
  for i in range(start, start + count):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


# fault -> (damage the step directory, a pattern of the reason reported)
DAMAGE = {
  "opt_state missing": (lambda d: shutil.rmtree(d / "opt_state"), r"item\(s\) \['opt_state'\] missing"),
  "params truncated": (lambda d: truncate(largest_file(d / "params")), r"unreadable|checksum mismatch"),
  "64 params bytes flipped": (
    lambda d: flip_bytes(largest_file(d / "params")),
    r"checksum mismatch in \d+ array\(s\), e\.g\. \[\"\['params'\]",
  ),
  "train_meta metadata truncated": (lambda d: truncate(d / "train_meta" / "_METADATA"), r"unreadable"),
  "data state truncated": (lambda d: truncate(next((d / "data").glob("process_*.json"))), r"item 'data' is unreadable"),
  "data state rewound": (
    lambda d: next((d / "data").glob("process_*.json")).write_text('{"next_index": 1}'),
    r"checksum mismatch in item 'data'",
  ),
  "model description missing": (lambda d: shutil.rmtree(d / "model"), r"item\(s\) \['model'\] missing"),
  "integrity record missing": (lambda d: shutil.rmtree(d / "integrity"), r"\['integrity'\] missing"),
}


@pytest.mark.parametrize("fault", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_training_resumes_exactly(reference, tmp_path, capsys, fault):
  workdir = copy_run(reference, tmp_path)
  damage, reason = DAMAGE[fault]
  damage(workdir / "checkpoints" / str(TOTAL))
  train(workdir)
  out = capsys.readouterr().out
  assert f"checkpoints/{TOTAL} is damaged" in out and f"resuming from step {TOTAL - EVERY} instead" in out, out
  import re

  assert re.search(reason, out), out
  assert f"resumed from {workdir / 'checkpoints'}/{TOTAL - EVERY}" in out
  assert (workdir / checkpointing.DAMAGED_SUBDIR / str(TOTAL)).is_dir()  # kept for inspection
  assert logged(workdir) == reference["metrics"]  # steps 5 and 6 redone bit for bit, each logged once
  # the first run's file is left as it was; the resumed run's file starts with a purge marker after the checkpoint
  assert tensorboard_events.purge_steps(workdir / "tensorboard") == [[], [TOTAL - EVERY + 1]]
  assert event_steps(workdir) == list(range(1, TOTAL + 1))
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), reference["params"])


def test_no_intact_checkpoint_stops_listing_every_step_and_changes_nothing(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  for step in (1, 2, 4, 6):
    shutil.rmtree(workdir / "checkpoints" / str(step) / "opt_state")
  before = (workdir / "metrics.jsonl").read_bytes()
  with pytest.raises(checkpointing.NoIntactCheckpointError) as error:
    train(workdir)
  for step in (1, 2, 4, 6):
    assert f"checkpoints/{step}: item(s) ['opt_state'] missing" in str(error.value)
    assert (workdir / "checkpoints" / str(step) / "params").is_dir()
  assert not (workdir / checkpointing.DAMAGED_SUBDIR).exists()
  assert (workdir / "metrics.jsonl").read_bytes() == before


def test_torn_log_lines_and_steps_past_the_checkpoint_are_cut_on_resume(reference, tmp_path, capsys):
  """A kill after steps 5-6 were logged but before checkpoint 6 committed, mid-way through a line."""
  workdir = copy_run(reference, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / str(TOTAL))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": 1.2')
  events = next((workdir / "tensorboard").glob("events.out.tfevents.*"))
  record = RecordWriter(str(tmp_path / "one_record"))
  record.write(
    Event(step=7, summary=Summary(value=[Summary.Value(tag="train/loss", simple_value=1.0)])).SerializeToString()
  )
  record.close()
  with open(events, "ab") as f:
    f.write((tmp_path / "one_record").read_bytes()[:-9])
  train(workdir)
  out = capsys.readouterr().out
  assert "removed 2 row(s) past step 4, dropped a torn last line" in out, out
  assert logged(workdir) == reference["metrics"]
  assert tensorboard_events.purge_steps(workdir / "tensorboard") == [[], [TOTAL - EVERY + 1]]
  assert event_steps(workdir) == list(range(1, TOTAL + 1))  # steps 5, 6 of the first run hidden, the torn 7 unread


def test_a_middle_line_that_cannot_be_read_is_an_error_naming_file_and_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
  with pytest.raises(metrics_lib.MetricsFileError, match=r"metrics\.jsonl, line 2: unreadable metrics row"):
    metrics_lib.read_metrics(str(tmp_path))


def test_rows_are_on_disk_before_the_checkpoint_that_covers_them_starts(tmp_path, monkeypatch):
  seen = {}
  original = checkpointing.TrainCheckpointer.save

  def save(self, step, *args, **kwargs):
    seen[step] = [r["step"] for r in metrics_lib.read_metrics(str(tmp_path / "run"))]
    return original(self, step, *args, **kwargs)

  fsynced = []
  real_fsync = os.fsync
  monkeypatch.setattr(checkpointing.TrainCheckpointer, "save", save)
  monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd) or real_fsync(fd))
  train(tmp_path / "run", **{"total_steps": 3, "log.every_steps": 10})
  assert seen == {1: [1], 2: [1, 2], 3: [1, 2, 3]}  # log windows are cut at every checkpoint
  assert len(fsynced) >= 3 * 2  # metrics.jsonl + the events file, at each of the three checkpoints


# --- non-finite updates ------------------------------------------------------------------------------


def lm_rows(n_batches, bad_from=None):
  spec = SyntheticLMSpec(vocab_size=VOCAB, seq_len=SEQ, samples_per_row=2, seed=0)
  rows = [make_row(spec, i) for i in range(n_batches * BATCH)]
  for row in rows[(bad_from or n_batches) * BATCH :]:
    row["loss_mask"] = np.where(row["loss_mask"] > 0, np.inf, 0).astype(np.float32)
  return iter(grain.MapDataset.source(rows).batch(BATCH).to_iter_dataset())


def test_an_update_that_would_overflow_the_parameters_is_skipped_and_never_saved(tmp_path):
  """lr=1e39 is a finite Python float but inf in float32: every update would make the weights inf."""
  workdir = tmp_path / "run"
  config = fault_config(workdir, **{"optimizer.lr": 1e39, "optimizer.min_lr": 0.0, "max_consecutive_nonfinite": 3})
  run = trainer.Trainer(config, devices=jax.devices()[:1])
  with pytest.raises(trainer.NonFiniteLossError, match=r"streak began at step 1; no checkpoint predates it"):
    run.run()
  rows = metrics_lib.read_metrics(str(workdir))
  assert [r["skipped"] for r in rows] == [1, 1, 1] and rows[-1]["skipped_steps"] == 3
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)  # only the update was bad
  initial = jax.device_get(trainer.fresh_state(run.setup, config.seed).params)
  saved = jax.device_get(models.load_checkpoint(workdir, step=2)[1])
  jax.tree.map(np.testing.assert_array_equal, saved, initial)  # nothing was applied


def test_lr_1e30_blows_up_after_one_update_and_the_abort_names_no_checkpoint(tmp_path):
  """The issue's case: the first update is finite (weights ~1e30) and is applied; every later loss is NaN.
  Checkpoint 1 holds those weights, so the message must not send the user back to it."""
  workdir = tmp_path / "run"
  with pytest.raises(trainer.NonFiniteLossError, match=r"streak began at step 2; no checkpoint predates it"):
    train(workdir, **{"optimizer.lr": 1e30, "optimizer.min_lr": 0.0, "max_consecutive_nonfinite": 3})
  assert [r["skipped"] for r in metrics_lib.read_metrics(str(workdir))] == [0, 1, 1, 1]


def test_abort_names_the_newest_checkpoint_from_before_the_parameters_that_failed(tmp_path):
  """Steps 1-4 train, then every batch gives a non-finite loss: the parameters of step 4 produced the first
  bad step, so checkpoints 4 and 6 hold them; the message points at checkpoint 2."""
  workdir = tmp_path / "run"
  with pytest.raises(
    trainer.NonFiniteLossError,
    match=r"streak began at step 5; the last checkpoint whose "
    r"parameters still gave a finite loss: .*checkpoints/2$",
  ):
    train(workdir, data_iterator=lm_rows(8, bad_from=4), total_steps=8, max_consecutive_nonfinite=3)
  rows = metrics_lib.read_metrics(str(workdir))
  assert [r["skipped"] for r in rows] == [0, 0, 0, 0, 1, 1, 1]


def test_a_checkpoint_with_non_finite_parameters_is_never_written(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  setup = trainer.build_setup(fault_config(workdir), devices=jax.devices()[:1])
  checkpointer = checkpointing.TrainCheckpointer(workdir)
  state = checkpointer.restore(TOTAL, setup.abstract_state)
  leaves, tree = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[0].set(np.nan)
  assert checkpointer.save(TOTAL + 1, state.replace(params=jax.tree.unflatten(tree, leaves))) is False
  checkpointer.close()
  assert not (workdir / "checkpoints" / str(TOTAL + 1)).exists()


# --- settings ----------------------------------------------------------------------------------------

BAD_SETTINGS = {
  "lr nan": ({"optimizer.lr": float("nan")}, r"config\.optimizer\.lr=nan: must be a finite number > 0"),
  "lr negative": ({"optimizer.lr": -1.0}, r"config\.optimizer\.lr=-1\.0: must be a finite number > 0"),
  "lr zero": ({"optimizer.lr": 0.0}, r"config\.optimizer\.lr=0\.0"),
  "min_lr above lr": ({"optimizer.min_lr": 1.0}, r"config\.optimizer\.min_lr=1\.0: must be <= lr \(0\.01\)"),
  "min_lr negative": ({"optimizer.min_lr": -1e-3}, r"config\.optimizer\.min_lr=-0\.001: must be a finite number >= 0"),
  "warmup past the run": ({"optimizer.warmup_steps": 7}, r"warmup_steps=7: must be <= total_steps \(6\)"),
  "total_steps negative": ({"total_steps": -5}, r"config\.total_steps=-5: must be an integer >= 1"),
  "checkpoint every 0 steps": (
    {"checkpoint.every_steps": 0},
    r"config\.checkpoint\.every_steps=0: must be an integer >= 1",
  ),
  "clipping negative": (
    {"optimizer.grad_clip": -1.0},
    r"config\.optimizer\.grad_clip=-1\.0: must be a finite number > 0",
  ),
  "mesh does not divide the devices": (
    {"mesh.tensor": 3},
    (
      r"config\.mesh: mesh axes \{'data': 1, 'fsdp': -1, 'tensor': 3\}: the fixed axes .* multiply to 3, which does "
      r"not divide the 1 device"
    ),
  ),
  "mesh product is not the device count": ({"mesh.fsdp": 2}, r"multiply to 2: needs 2 devices, found 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_settings_are_refused_before_compiling_naming_the_setting(tmp_path, case):
  changes, pattern = BAD_SETTINGS[case]
  with pytest.raises(ValueError, match=pattern):
    trainer.build_setup(fault_config(tmp_path, **changes), devices=jax.devices()[:1])


def test_batch_that_does_not_split_over_the_mesh_names_the_batch_size(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py)")
  with pytest.raises(ValueError, match=r"global_batch_size=4 must be divisible by num_microbatches=1 x the 8 batch"):
    trainer.build_setup(fault_config(tmp_path, **{"data.global_batch_size": 4}), devices=jax.devices()[:8])


def test_init_from_with_existing_checkpoints_says_loudly_that_it_resumes(reference, tmp_path, capsys):
  workdir = copy_run(reference, tmp_path)
  train(workdir, **{"checkpoint.init_from": "/elsewhere/pretrained"})
  out = capsys.readouterr().out
  assert (
    "WARNING: config.checkpoint.init_from=/elsewhere/pretrained is NOT used: "
    f"{workdir / 'checkpoints'} already holds checkpoints (steps [1, 2, 4, 6])"
  ) in out
  assert f"resumed from {workdir / 'checkpoints'}/{TOTAL}" in out


def test_missing_config_file_names_its_path(tmp_path):
  missing = tmp_path / "no_such_config.py"
  result = subprocess.run(
    [sys.executable, str(REPO / "train.py"), f"--config={missing}"],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    check=False,
  )
  assert result.returncode == 1
  assert f"--config: config file {missing} does not exist" in result.stderr, result.stderr[-2000:]


def test_loading_a_damaged_checkpoint_for_inference_names_it(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  flip_bytes(largest_file(workdir / "checkpoints" / str(TOTAL) / "params"))
  with pytest.raises(
    orbax_checkpoint.DamagedCheckpointError,
    match=rf"checkpoints/{TOTAL} is damaged: checksum "
    r"mismatch in \d+ parameter",
  ):
    models.load_checkpoint(workdir)
  models.load_checkpoint(workdir, step=TOTAL, param_dtype="bfloat16")  # a cast is not compared
  models.load_checkpoint(workdir, step=TOTAL - EVERY)  # the intact one loads


def test_a_mesh_that_cannot_split_a_parameter_names_it(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py)")
  config = fault_config(tmp_path, **{"mesh.fsdp": 1, "mesh.tensor": 8})
  with pytest.raises(
    ValueError,
    match=r"parameter .* has dimension \d \(logical axis '\w+'\) of size \d+, which "
    r"mesh axes tensor=8 cannot split into 8 equal parts",
  ):
    trainer.build_setup(config, devices=jax.devices()[:8])
