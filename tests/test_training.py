"""Training: batch contract, optimizer groups, train step (loss falls, freezing, sharding, NaN skipping).

Batches come from real grain pipelines (`grain.MapDataset` over small in-memory arrays). The tiny
text-only CausalLM keeps compile times low; one test runs the tiny NVLM-D in its pretraining setup.
"""

import json
import math
import os

import grain
import jax
import numpy as np
import pytest
import tensorboard_events
from jax.sharding import PartitionSpec as P

from nvlm_jax import models
from nvlm_jax.checkpoint import orbax_checkpoint
from nvlm_jax.training import batch as batch_lib
from nvlm_jax.training import config_base, flops, optimizer, trainer
from nvlm_jax.training.synthetic_lm import SyntheticLMSpec, make_row

VOCAB, SEQ, BATCH = 128, 32, 8
# Tiny models: LLVM optimization costs more compile time than it saves at run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def lm_config(**changes):
  c = config_base.base_config()
  c.model.decoder = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    rope_theta=10_000.0,
  )
  c.model.dtype = "float32"
  c.trainable = ("decoder", "final_norm", "lm_head")  # the token embedding stays frozen
  c.optimizer.update(lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.01, grad_clip=1.0)
  c.data.update(kind="synthetic_lm", global_batch_size=BATCH, seq_len=SEQ, num_microbatches=2)
  c.total_steps = 100
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.compiler_options = FAST_COMPILE
  for k, v in changes.items():
    c[k] = v
  return c


def lm_batches(n_batches: int = 6, seed: int = 0):
  """A grain iterator over in-memory packed token rows (the training-batch contract)."""
  spec = SyntheticLMSpec(vocab_size=VOCAB, seq_len=SEQ, samples_per_row=2, seed=seed)
  rows = [make_row(spec, i) for i in range(n_batches * BATCH)]
  return iter(grain.MapDataset.source(rows).batch(BATCH).repeat().to_iter_dataset())


class Runner:
  """setup + initial state + compiled step for one config on some devices (compiled once per module)."""

  def __init__(self, config, devices):
    self.setup = trainer.build_setup(config, devices=devices)
    self.initial = jax.device_get(trainer.fresh_state(self.setup, config.seed))
    with trainer._MeshContext(self.setup):
      self.step = (
        trainer.jitted_train_step(self.setup)
        .lower(self.setup.abstract_state, trainer.abstract_global_batch(self.setup))
        .compile()
      )

  def state(self):
    return jax.device_put(self.initial, self.setup.state_shardings)

  def run(self, batches, steps):
    state, history = self.state(), []
    for _ in range(steps):
      state, metrics = self.step(state, trainer.to_global_batch(next(batches), self.setup))
      history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def one_device():
  return Runner(lm_config(), jax.devices()[:1])


@pytest.fixture(scope="module")
def eight_devices():
  config = lm_config()
  config.mesh.update(fsdp=4, tensor=2)
  return Runner(config, jax.devices()[:8])


# --- contract and pieces -----------------------------------------------------------------------------


def test_batch_contract_accepts_pipeline_rows_and_names_the_bad_key():
  batch = next(lm_batches())
  batch_lib.check_batch(batch, multimodal=False, batch_size=BATCH, seq_len=SEQ)
  batch_lib.check_batch_values(batch)
  bad = dict(batch, targets=batch["targets"].astype(np.int64))
  with pytest.raises(TypeError, match="targets"):
    batch_lib.check_batch(bad)
  with pytest.raises(ValueError, match="missing \\['pixel_values', 'tile_mask'\\]"):
    batch_lib.check_batch(batch, multimodal=True)
  short = dict(batch, positions=batch["positions"][:, :-1])
  with pytest.raises(ValueError, match="positions"):
    batch_lib.check_batch(short)


def test_lr_schedule_is_megatron_warmup_then_cosine_to_min():
  sched = optimizer.lr_schedule(1e-4, 2.5e-5, warmup_steps=10, decay_steps=110)
  np.testing.assert_allclose(float(sched(0)), 1e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(9)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), (1e-4 + 2.5e-5) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(sched(110)), 2.5e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10_000)), 2.5e-5, rtol=1e-6)


@pytest.mark.parametrize(
  "max_lr,min_lr,warmup,decay",
  [(1e-4, 2.5e-5, 10, 110), (3e-4, 0.0, 0, 50), (1e-3, 1e-4, 5, 5), (2e-5, 2e-5, 3, 20), (0.0, 0.0, 4, 9)],
)
def test_lr_schedule_matches_the_megatron_formula_at_every_step(max_lr, min_lr, warmup, decay):
  """optax's schedule (warmup one step ahead) against the formula re-derived in numpy, step by step."""
  steps = np.arange(decay + 20)
  warm = max_lr * np.minimum(steps + 1.0, max(warmup, 1)) / max(warmup, 1)
  progress = np.clip((steps - warmup) / max(decay - warmup, 1), 0.0, 1.0)
  cosine = min_lr + 0.5 * (max_lr - min_lr) * (1.0 + np.cos(np.pi * progress))
  expected = np.where(steps < warmup, warm, cosine)
  sched = optimizer.lr_schedule(max_lr, min_lr, warmup_steps=warmup, decay_steps=decay)
  got = np.array([float(sched(jax.numpy.int32(s))) for s in steps])
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-12)


def test_trainable_patterns_select_by_path_and_reject_typos():
  params = {
    "vision_model": {"encoder": {"w": 0}},
    "projector": {"linear_1": {"kernel": 0}},
    "language_model": {"decoder": {"layers": {"xattn_cross_attention": {"q": 0}, "mlp": {"k": 0}}}},
  }
  labels = optimizer.trainable_labels(params, ("projector", "*cross_attention*"))
  assert labels["projector"]["linear_1"]["kernel"] == "trainable"
  assert labels["language_model"]["decoder"]["layers"]["xattn_cross_attention"]["q"] == "trainable"
  assert labels["language_model"]["decoder"]["layers"]["mlp"]["k"] == "frozen"
  assert labels["vision_model"]["encoder"]["w"] == "frozen"
  with pytest.raises(ValueError, match="select no parameter.*top-level modules are"):
    optimizer.trainable_labels(params, ("projektor",))


def test_weight_decay_skips_biases_norms_and_stacked_vectors():
  specs = {
    "kernel": P("layers", "embed", "mlp"),
    "bias": P("layers", "mlp"),
    "scale": P("heads", "head_dim"),
    "embedding": P("vocab", "embed"),
    "ls1": P("embed"),
  }
  mask = optimizer.weight_decay_mask(specs)
  assert mask == {"kernel": True, "bias": False, "scale": False, "embedding": True, "ls1": False}


def test_metrics_writer_logs_tensorboard_scalars_and_marks_a_resume_for_purging(tmp_path):
  """Numeric metrics reach TensorBoard under train/ (tensorboardX files, read back with their CRCs checked); a writer
  resumed at step 2 opens a new file whose START marker at step 3 hides the first run's steps 3 and 4."""
  from nvlm_jax.training import metrics as metrics_lib

  first = metrics_lib.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    first.write(step, {"loss": 10.0 + step, "note": "text", "skipped": False})
  first.close()
  resumed = metrics_lib.MetricsWriter(str(tmp_path), resume_step=2)
  resumed.write(3, {"loss": 0.5})
  resumed.close()
  logdir = tmp_path / "tensorboard"
  assert tensorboard_events.purge_steps(logdir) == [[], [3]]
  assert tensorboard_events.shown_scalars(logdir, "train/loss") == [(1, 11.0), (2, 12.0), (3, 0.5)]
  tags = {
    v.tag
    for f in tensorboard_events.event_files(logdir)
    for e in tensorboard_events.read_events(f)
    for v in e.summary.value
  }
  assert tags == {"train/loss"}
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3]


def test_flops_follow_the_documented_multipliers():
  from nvlm_jax import presets

  lm = presets.get_preset("tiny_llm")
  fwd = flops.decoder_forward(lm, 2, 16)
  total = flops.train_step_flops(lm, batch_size=2, seq_len=16, trainable_towers={"language_model"})["total"]
  assert total == pytest.approx(3 * fwd.matmul + 3 * fwd.attention)
  assert fwd.matmul == 2 * flops.decoder_matmul_params(lm) * 32
  d = presets.get_preset("tiny_nvlm_d")
  pre = flops.train_step_flops(d, batch_size=2, seq_len=64, num_tiles=4, trainable_towers={"projector"})
  vit = flops.vision_forward(d.vision, 4)
  proj = flops.projector_forward(d.projector, 4 * d.tokens_per_tile)
  llm = flops.decoder_forward(d.llm, 2, 64)
  assert pre["vision_model"] == pytest.approx(vit.matmul + vit.attention)  # forward only
  assert pre["projector"] == pytest.approx(3 * proj.matmul)  # fwd + input grads + weight grads
  assert pre["language_model"] == pytest.approx(2 * llm.matmul + 3 * llm.attention)  # no weight grads


# --- the train step --------------------------------------------------------------------------------


def test_loss_falls_frozen_params_stay_bit_identical_and_have_no_optimizer_state(one_device):
  state, history = one_device.run(lm_batches(), 12)
  losses = [float(m["loss"]) for m in history]
  assert losses[-1] < losses[0] - 0.3, losses
  before = one_device.initial.params
  after = jax.device_get(state.params)
  np.testing.assert_array_equal(after["embed_tokens"]["embedding"], before["embed_tokens"]["embedding"])
  changed = jax.tree.map(
    lambda a, b: not np.array_equal(a, b),
    {k: after[k] for k in ("decoder", "lm_head")},
    {k: before[k] for k in ("decoder", "lm_head")},
  )
  assert all(jax.tree.leaves(changed)), changed
  moment_paths = [optimizer.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert any("mu/decoder" in p for p in moment_paths)
  assert not any("embed_tokens" in p for p in moment_paths), moment_paths
  assert all(int(m["skipped"]) == 0 for m in history)


def test_eight_devices_give_the_same_losses_as_one(one_device, eight_devices):
  state1, hist1 = one_device.run(lm_batches(), 4)
  state8, hist8 = eight_devices.run(lm_batches(), 4)
  np.testing.assert_allclose([float(m["loss"]) for m in hist8], [float(m["loss"]) for m in hist1], rtol=1e-5)
  np.testing.assert_allclose([float(m["grad_norm"]) for m in hist8], [float(m["grad_norm"]) for m in hist1], rtol=1e-4)
  kernel = state8.params["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")  # really sharded, not replicated
  # Adam divides by sqrt(nu): tiny gradients amplify summation-order noise in the weights, not the loss.
  chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-4)
  jax.tree.map(chex_close, jax.device_get(state8.params), jax.device_get(state1.params))


def test_sharding_rules_come_from_the_config():
  """config.sharding_rules places the parameters (default: nvlm_jax.sharding.LOGICAL_AXIS_RULES); a bad entry
  is refused naming it."""
  config = lm_config()
  config.mesh.update(fsdp=4, tensor=2)
  default = trainer.build_setup(config, devices=jax.devices()[:8])
  assert default.param_shardings["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
  config.sharding_rules = tuple(
    ("mlp", None) if name == "mlp" else (name, axes) for name, axes in config.sharding_rules
  )
  changed = trainer.build_setup(config, devices=jax.devices()[:8])
  assert changed.param_shardings["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, "fsdp", None)
  config.sharding_rules = config.sharding_rules + (("embed", "tensr"),)
  with pytest.raises(ValueError, match=r"config\.sharding_rules\[\d+\] = \('embed', 'tensr'\)"):
    trainer.build_setup(config, devices=jax.devices()[:8])


def test_microbatch_accumulation_equals_one_big_batch(one_device):
  assert one_device.setup.config.data.num_microbatches == 2
  config = lm_config()
  config.data.num_microbatches = 1
  whole = Runner(config, jax.devices()[:1])
  _, h1 = whole.run(lm_batches(), 2)
  _, h4 = one_device.run(lm_batches(), 2)
  np.testing.assert_allclose([float(m["loss"]) for m in h4], [float(m["loss"]) for m in h1], rtol=1e-5)
  np.testing.assert_allclose([float(m["grad_norm"]) for m in h4], [float(m["grad_norm"]) for m in h1], rtol=1e-5)


def test_nan_batch_is_skipped_and_counted(one_device):
  good = lm_batches()
  b1, b2, b3 = next(good), next(good), next(good)
  poisoned = dict(b2, loss_mask=np.where(b2["loss_mask"] > 0, np.nan, 0.0).astype(np.float32))
  setup = one_device.setup
  state = one_device.state()
  state, m1 = one_device.step(state, trainer.to_global_batch(b1, setup))
  after_good = jax.device_get(state)
  state, m2 = one_device.step(state, trainer.to_global_batch(poisoned, setup))
  assert not math.isfinite(float(m2["loss"]))
  assert int(m2["skipped"]) == 1 and int(m2["skipped_steps"]) == 1 and int(m2["nonfinite_streak"]) == 1
  after_bad = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after_bad.params, after_good.params)
  jax.tree.map(np.testing.assert_array_equal, after_bad.opt_state, after_good.opt_state)
  assert int(after_bad.step) == 2 and int(after_bad.applied_steps) == 1
  state, m3 = one_device.step(state, trainer.to_global_batch(b3, setup))
  assert int(m3["skipped"]) == 0 and int(m3["nonfinite_streak"]) == 0 and int(m3["skipped_steps"]) == 1


def test_trainer_aborts_after_too_many_nonfinite_steps_in_a_row(tmp_path, one_device):
  config = lm_config(total_steps=6, max_consecutive_nonfinite=3, workdir=str(tmp_path))
  config.log.every_steps = 1
  config.checkpoint.every_steps = 100
  spec = SyntheticLMSpec(vocab_size=VOCAB, seq_len=SEQ)
  rows = [make_row(spec, i) for i in range(6 * BATCH)]
  for row in rows[BATCH:]:  # the first batch is fine (the trainer checks it), then every step overflows
    row["loss_mask"] = np.where(row["loss_mask"] > 0, np.inf, 0).astype(np.float32)
  batches = iter(grain.MapDataset.source(rows).batch(BATCH).to_iter_dataset())
  with pytest.raises(trainer.NonFiniteLossError, match="3 consecutive steps \\(up to step 4\\).*skipped"):
    trainer.Trainer(config, devices=jax.devices()[:1], data_iterator=batches).run()
  steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [m["skipped"] for m in steps] == [0, 1, 1, 1] and steps[-1]["skipped_steps"] == 3


def test_trainer_writes_metrics_and_a_loadable_checkpoint(tmp_path):
  config = lm_config(total_steps=4, workdir=str(tmp_path))
  config.log.update(every_steps=2, peak_tflops_per_device=1.0)
  config.checkpoint.every_steps = 2
  history = trainer.Trainer(config, devices=jax.devices()[:1]).run()
  assert [h["step"] for h in history] == [1, 2, 3, 4]
  for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "samples_per_s", "tflops_per_step", "mfu"):
    assert key in history[-1], key
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  assert len(lines) == 4
  assert os.listdir(tmp_path / "tensorboard")
  model, params = models.load_checkpoint(tmp_path)
  assert type(model).__name__ == "CausalLM"
  ids = np.arange(1, 9, dtype=np.int32)[None]
  logits = model.apply({"params": params}, ids)
  assert logits.shape == (1, 8, VOCAB) and np.isfinite(np.asarray(logits)).all()
  assert orbax_checkpoint.is_training_checkpoint(tmp_path)
  assert orbax_checkpoint.is_training_checkpoint(tmp_path / "checkpoints" / "4")
  assert not orbax_checkpoint.is_training_checkpoint(tmp_path / "tensorboard")


def test_checkpoint_steps_lists_only_steps_with_parameters(tmp_path):
  checkpoints = tmp_path / "checkpoints"
  for name in ("2/params", "10/params", "7/opt_state", "5.orbax-checkpoint-tmp-1/params", "notes"):
    (checkpoints / name).mkdir(parents=True)
  # numeric order; step 7 (a save killed before its parameters) and orbax's temporary directory are not steps
  assert orbax_checkpoint.checkpoint_steps(checkpoints) == [2, 10]
  assert orbax_checkpoint.resolve_step(tmp_path, None) == (checkpoints, 10)
  with pytest.raises(FileNotFoundError, match="available steps \\[2, 10\\]"):
    orbax_checkpoint.resolve_step(tmp_path, 7)
  assert orbax_checkpoint.checkpoint_steps(tmp_path / "missing") == []


# --- NVLM-D ------------------------------------------------------------------------------------------


def nvlm_d_batches(config, batch_size=4, seq_len=48, tiles=2, n_batches=2, seed=0):
  """Rows: text, one run of tokens_per_tile placeholders per valid tile, then an answer that depends on the image."""
  from nvlm_jax import presets

  model_cfg = presets.get_preset("tiny_nvlm_d")
  per_tile, size, ph = model_cfg.tokens_per_tile, model_cfg.vision.image_size, model_cfg.image_token_id
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n_batches * batch_size):
    valid = int(rng.integers(1, tiles + 1))
    colour = int(rng.integers(0, 4))
    pixels = np.zeros((tiles, size, size, 3), np.float32)
    pixels[:valid] = rng.normal(size=(valid, size, size, 3)) * 0.1 + (colour - 1.5)
    ids = [5, 6] + [ph] * (per_tile * valid) + [7] + [10 + colour] * 4
    n = len(ids)
    row = {
      "input_ids": np.zeros(seq_len, np.int32),
      "targets": np.zeros(seq_len, np.int32),
      "loss_mask": np.zeros(seq_len, np.float32),
      "segment_ids": np.zeros(seq_len, np.int32),
      "positions": np.zeros(seq_len, np.int32),
      "pixel_values": pixels,
      "tile_mask": np.arange(tiles) < valid,
    }
    row["input_ids"][:n] = ids
    row["targets"][: n - 1] = ids[1:]
    row["loss_mask"][n - 6 : n - 1] = 1.0  # predict the answer tokens after the image
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    rows.append(row)
  return iter(grain.MapDataset.source(rows).batch(batch_size).repeat().to_iter_dataset())


def tiny_d_config(trainable: tuple[str, ...]):
  c = config_base.base_config()
  c.model.preset = "tiny_nvlm_d"
  c.model.dtype = "float32"
  c.trainable = trainable
  c.compiler_options = FAST_COMPILE
  c.optimizer.update(lr=3e-3, min_lr=3e-4, warmup_steps=1, weight_decay=0.1, grad_clip=10.0)
  c.data.update(global_batch_size=4, seq_len=48, max_tiles=2)
  c.total_steps = 100
  return c


def test_nvlm_d_pretraining_trains_only_the_projector():
  c = tiny_d_config(("projector",))
  runner = Runner(c, jax.devices()[:1])
  batch = next(nvlm_d_batches(c))
  batch_lib.check_batch(batch, multimodal=True)
  state, history = runner.run(nvlm_d_batches(c), 10)
  losses = [float(m["loss"]) for m in history]
  assert losses[-1] < losses[0], losses
  before, after = runner.initial.params, jax.device_get(state.params)
  for frozen in ("vision_model", "language_model"):
    jax.tree.map(np.testing.assert_array_equal, after[frozen], before[frozen])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after["projector"], before["projector"])
  assert all(jax.tree.leaves(changed)), changed
  moment_paths = [optimizer.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert moment_paths and not any("vision_model" in p or "language_model" in p for p in moment_paths)


def test_a_vit_listed_in_trainable_trains():
  """The preset freezes the ViT behind a stop_gradient; listing it in `trainable` must lift that, or every ViT
  weight would silently get a zero gradient."""
  c = tiny_d_config(("vision_model", "projector"))
  runner = Runner(c, jax.devices()[:1])
  assert runner.setup.model_config.freeze_vision is False
  state, _ = runner.run(nvlm_d_batches(c), 2)
  before, after = runner.initial.params, jax.device_get(state.params)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after["vision_model"], before["vision_model"])
  assert all(jax.tree.leaves(changed)), changed
  jax.tree.map(np.testing.assert_array_equal, after["language_model"], before["language_model"])


def test_default_tiny_d_config_trains_on_the_data_pipeline_and_leaves_a_loadable_model(tmp_path):
  """configs/tiny_d.py end to end (few steps): nvlm_jax.data.pipeline batches, processor saved, checkpoint loads."""
  import importlib.util
  from pathlib import Path
  from nvlm_jax.data.processor_setup import read_run_processor as load_processor

  path = Path(__file__).resolve().parents[1] / "configs" / "tiny_d.py"
  spec = importlib.util.spec_from_file_location("tiny_d", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.update(workdir=str(tmp_path), total_steps=3, compiler_options=FAST_COMPILE)
  c.optimizer.warmup_steps = 3  # the settings check refuses a warmup longer than the run
  c.data.update(global_batch_size=4, seq_len=160)
  c.log.update(every_steps=1, tensorboard=False)
  history = trainer.Trainer(c, devices=jax.devices()[:1]).run()
  assert [h["step"] for h in history] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in history)
  assert history[0]["loss"] > 5.0  # ~log(512) at init
  model, params = models.load_checkpoint(tmp_path)
  processor = load_processor(tmp_path)
  assert type(model).__name__ == "NVLMD" and processor.image_context_id == model.config.image_token_id
  enc = processor([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)
  logits = model.apply({"params": params}, enc["input_ids"].astype(np.int32))
  assert logits.shape[-1] == 512 and np.isfinite(np.asarray(logits)).all()


def test_init_from_a_params_only_checkpoint_starts_from_those_parameters(tmp_path, one_device):
  """A model saved with nvlm_jax.models.save_checkpoint (params + description, no optimizer state) is a valid
  `checkpoint.init_from`; training then starts from exactly those parameters."""
  models.save_checkpoint(tmp_path / "stitched", one_device.setup.model_config, one_device.initial.params)
  config = lm_config(total_steps=2, workdir=str(tmp_path / "run"))
  config.checkpoint.init_from = str(tmp_path / "stitched")
  config.log.update(every_steps=1, tensorboard=False)
  history = trainer.Trainer(config, devices=jax.devices()[:1], data_iterator=lm_batches()).run()
  _, expected = one_device.run(lm_batches(), 2)
  np.testing.assert_allclose([h["loss"] for h in history], [float(m["loss"]) for m in expected], rtol=1e-6)
