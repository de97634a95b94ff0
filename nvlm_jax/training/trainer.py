"""The training loop: build model, mesh, sharded state and data; run the jitted step; log; checkpoint.

    train(config)                       # what train.py runs
    trainer = Trainer(config); trainer.run()

Setup (Trainer.__init__) allocates nothing big: the model, optimizer and state are described abstractly
(ShapeDtypeStructs with NamedShardings). `Trainer.run` then creates the state already sharded (fresh
init under jit with out_shardings, or an orbax restore onto the shardings, or an imported checkpoint
placed onto them) and loops. The same abstract description drives the planner (plan.py).

The data iterator is any grain `DatasetIterator` yielding THIS process's rows of the training batch
(batch.py); rows are assembled into global arrays with `jax.make_array_from_process_local_data`.
`config.data.kind` picks the factory: "nvlm_pipeline" -> nvlm_jax.data.pipeline.make_train_iterator,
"synthetic_lm" -> the text-only synthetic LM set (synthetic_lm.py); or pass an iterator to Trainer.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nvlm_jax import models
from nvlm_jax import sharding as sharding_lib
from nvlm_jax.checkpoint import orbax_checkpoint
from nvlm_jax.data import pipeline, processor_setup
from nvlm_jax.training import batch as batch_lib
from nvlm_jax.training import checkpointing, config_base, optimizer, run_config, run_identity
from nvlm_jax.training import flops as flops_lib
from nvlm_jax.training import metrics as metrics_lib
from nvlm_jax.training.synthetic_lm import make_synthetic_lm_iterator
from nvlm_jax.training.train_step import TrainState, batch_sharding, jit_train_step, make_train_step, new_train_state


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps had a NaN/Inf loss or gradient."""


@dataclasses.dataclass
class Setup:
  """Everything derived from the config before any array exists (shared with the planner)."""

  config: Any
  mesh: jax.sharding.Mesh
  model_config: Any
  model: nn.Module
  labels: Any
  tx: Any
  schedule: Any
  abstract_state: TrainState  # ShapeDtypeStructs carrying their NamedShardings
  state_shardings: TrainState
  batch_shardings: dict[str, NamedSharding]
  multimodal: bool
  rules: Any

  @property
  def param_shardings(self):
    return self.state_shardings.params


def _shapes_with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def unique_logical_axes(specs):
  """Logical PartitionSpecs with a repeated axis name kept only at its first position.

  Nested scans (NVLM-X/H: groups of layers, each group a scan over layers) stack parameters on two
  leading axes that are both named "layers"; flax refuses a name twice, and neither may be sharded.
  """

  def fix(spec):
    seen, out = set(), []
    for name in spec:
      out.append(None if isinstance(name, str) and name in seen else name)
      if isinstance(name, str):
        seen.add(name)
    return P(*out)

  return jax.tree.map(fix, specs, is_leaf=lambda x: isinstance(x, P))


def build_setup(config, *, devices=None, model_config=None) -> Setup:
  """Mesh, model, trainable labels, optimizer and the abstract sharded TrainState for `config`."""
  config_base.check_config(config)
  try:
    mesh = sharding_lib.create_mesh(dict(config.mesh), devices)
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None
  rules = sharding_lib.checked_rules(
    config.get("sharding_rules", sharding_lib.LOGICAL_AXIS_RULES), "config.sharding_rules"
  )
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = int(config.data.get("num_microbatches", 1))
  if config.data.global_batch_size % (shards * micro):
    raise ValueError(
      f"config.data.global_batch_size={config.data.global_batch_size} must be divisible by "
      f"num_microbatches={micro} x the {shards} batch shards (mesh data x fsdp), so every "
      "microbatch splits evenly over the devices"
    )
  if model_config is None:
    model_config = models.model_config_from_settings(config.model)
  model = models.module_for_config(model_config)
  boxed = models.abstract_variables(model, model_config)["params"]
  logical = unique_logical_axes(nn.get_partition_spec(boxed))
  abstract_params = nn.meta.unbox(boxed)
  labels = optimizer.trainable_labels(abstract_params, tuple(config.trainable))
  # `trainable` alone says whether the ViT trains; its stop_gradient follows (a trainable ViT behind a
  # stop_gradient would silently get zero gradients, a frozen one without it would cost a backward pass).
  vision_trains = optimizer.TRAINABLE in jax.tree.leaves(labels.get("vision_model", {}))
  if hasattr(model_config, "freeze_vision") and model_config.freeze_vision == vision_trains:
    model_config = dataclasses.replace(model_config, freeze_vision=not vision_trains)
    model = models.module_for_config(model_config)
  decay_mask = optimizer.weight_decay_mask(logical)
  tx, schedule = optimizer.make_optimizer(config.optimizer, labels, decay_mask, config.total_steps)

  param_shardings = sharding_lib.logical_to_sharding(logical, mesh, rules)
  sharding_lib.check_divisible(abstract_params, param_shardings, logical)
  opt_logical = unique_logical_axes(optimizer.opt_state_logical_specs(tx, boxed))
  opt_shardings = sharding_lib.logical_to_sharding(opt_logical, mesh, rules)
  abstract_opt = nn.meta.unbox(optimizer.abstract_opt_state_with_names(tx, boxed))
  replicated = NamedSharding(mesh, P())
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  state_shardings = TrainState(
    step=replicated,
    applied_steps=replicated,
    skipped_steps=replicated,
    nonfinite_streak=replicated,
    rng=replicated,
    params=param_shardings,
    opt_state=opt_shardings,
  )
  abstract_state = TrainState(
    step=scalar,
    applied_steps=scalar,
    skipped_steps=scalar,
    nonfinite_streak=scalar,
    rng=rng,
    params=_shapes_with_shardings(abstract_params, param_shardings),
    opt_state=_shapes_with_shardings(abstract_opt, opt_shardings),
  )
  multimodal = models.is_multimodal(model_config)
  ndims = {"pixel_values": 5}
  batch_shardings = {k: batch_sharding(mesh, ndims.get(k, 2)) for k in batch_lib.batch_keys(multimodal)}
  return Setup(
    config,
    mesh,
    model_config,
    model,
    labels,
    tx,
    schedule,
    abstract_state,
    state_shardings,
    batch_shardings,
    multimodal,
    rules,
  )


def compiler_options(config) -> dict | None:
  """XLA options from `config.compiler_options` (e.g. {"xla_backend_optimization_level": 0} compiles tiny
  CPU models ~3x faster; tests use it). None when empty."""
  opts = config.get("compiler_options", None)
  opts = opts.to_dict() if hasattr(opts, "to_dict") else dict(opts or {})
  return opts or None


def init_compiler_options(config) -> dict | None:
  """Initialization runs once: on CPU skip LLVM's optimizations, which cost far more compile time than they
  save (seconds for the tiny models). Accelerators keep the default."""
  opts = dict(compiler_options(config) or {})
  if jax.default_backend() == "cpu":
    opts.setdefault("xla_backend_optimization_level", 0)
  return opts or None


def jitted_train_step(setup: Setup):
  """The jitted train step (not yet lowered); trace it inside `_MeshContext(setup)`."""
  num_micro = setup.config.data.get("num_microbatches", 1)
  step = make_train_step(
    setup.model, setup.tx, setup.labels, setup.schedule, num_microbatches=num_micro, mesh=setup.mesh
  )
  return jit_train_step(
    step, setup.state_shardings, setup.batch_shardings, setup.mesh, compiler_options=compiler_options(setup.config)
  )


class _MeshContext:
  """jax.set_mesh + the logical axis rules, for tracing model code."""

  def __init__(self, setup: Setup):
    self.setup = setup

  def __enter__(self):
    self._mesh = jax.set_mesh(self.setup.mesh)
    self._mesh.__enter__()
    self._rules = nn.logical_axis_rules(self.setup.rules)
    self._rules.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules.__exit__(*exc)
    self._mesh.__exit__(*exc)


def abstract_global_batch(setup: Setup) -> dict[str, jax.ShapeDtypeStruct]:
  data = setup.config.data
  tile = setup.model_config.vision.image_size if setup.multimodal else 0
  return batch_lib.abstract_batch(
    data.global_batch_size,
    data.seq_len,
    multimodal=setup.multimodal,
    max_tiles=data.get("max_tiles", 1),
    tile_size=tile,
    sharding=setup.batch_shardings,
  )


def model_flops_per_step(setup: Setup) -> dict[str, float] | None:
  """Analytic model FLOPs of one step per tower and 'total' (flops.py), or None if not modelled."""
  data = setup.config.data
  towers = flops_lib.trainable_towers_from_labels(setup.labels, setup.model_config)
  slots = data.get("max_tiles", 0) if setup.multimodal else 0
  tiles = data.get("tile_budget", 0) or data.global_batch_size * slots
  try:
    return flops_lib.train_step_flops(
      setup.model_config,
      batch_size=data.global_batch_size,
      seq_len=data.seq_len,
      num_tiles=tiles,
      tile_slots=slots,
      trainable_towers=towers,
    )
  except NotImplementedError:
    return None


# --- data ------------------------------------------------------------------------------------------


def make_processor(config, model_config, workdir: str | None = None):
  """(processor, kwargs, model_config synced to its token ids) for data.kind 'nvlm_pipeline', else (None, None, cfg)."""
  if config.data.get("kind", "nvlm_pipeline") != "nvlm_pipeline":
    return None, None, model_config
  processor, kwargs = processor_setup.build_processor(
    config.data, model_config, workdir, default_tokenizer=config.checkpoint.get("init_from", "")
  )
  return processor, kwargs, processor_setup.sync_model_config(model_config, processor)


def make_data_iterator(config, setup: Setup, processor=None):
  """This process's training iterator for `config.data.kind` (see module docstring)."""
  kind = config.data.get("kind", "nvlm_pipeline")
  if kind == "synthetic_lm":
    llm = getattr(setup.model_config, "llm", setup.model_config)
    return make_synthetic_lm_iterator(
      config.data,
      vocab_size=llm.vocab_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      seed=config.seed,
    )
  if kind == "nvlm_pipeline":
    if processor is None:
      processor = make_processor(config, setup.model_config)[0]
    return pipeline.make_train_iterator(
      config.data,
      processor,
      setup.mesh,
      model_config=setup.model_config,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      seed=config.seed,
    )
  raise ValueError(f"config.data.kind={kind!r}; expected 'nvlm_pipeline' or 'synthetic_lm'")


def check_local_batch(local: dict[str, np.ndarray], setup: Setup) -> None:
  """This process's rows against the batch contract and the config's shapes (batch.py)."""
  data = setup.config.data
  rows = data.global_batch_size // jax.process_count()
  keys = batch_lib.batch_keys(setup.multimodal)
  tile = setup.model_config.vision.image_size if setup.multimodal else None
  batch = {k: local[k] for k in keys if k in local}
  batch_lib.check_batch(
    batch,
    multimodal=setup.multimodal,
    batch_size=rows,
    seq_len=data.seq_len,
    max_tiles=data.get("max_tiles", None) if setup.multimodal else None,
    tile_size=tile,
  )
  batch_lib.check_batch_values(batch)


def to_global_batch(local: dict[str, np.ndarray], setup: Setup) -> dict[str, jax.Array]:
  """This process's rows -> global jax.Arrays sharded over the batch axes (all processes call it)."""
  out = {}
  nproc = jax.process_count()
  for key, sharding in setup.batch_shardings.items():
    if key not in local:
      raise KeyError(f"training batch has no {key!r}; keys: {sorted(local)} (see nvlm_jax/training/batch.py)")
    value = np.asarray(local[key])
    global_shape = (value.shape[0] * nproc,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


# --- state creation --------------------------------------------------------------------------------


def strip_boxes(tree):
  """Boxed flax variables -> plain arrays, without the sharding constraint `nn.meta.unbox` adds (the
  jit's out_shardings place them; nested-scan names would trip the constraint, see unique_logical_axes)."""
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
  )


def fresh_state(setup: Setup, seed: int) -> TrainState:
  """Random init + optimizer init, every array created directly on its sharding."""
  init = models.init_fn(setup.model, setup.model_config)

  def make(rng):
    params = strip_boxes(init(rng))["params"]
    return new_train_state(params, setup.tx.init(params), jax.random.fold_in(rng, 1))

  with _MeshContext(setup):
    return jax.jit(make, out_shardings=setup.state_shardings, compiler_options=init_compiler_options(setup.config))(
      jax.random.key(seed)
    )


def state_from_params(setup: Setup, params, seed: int) -> TrainState:
  """A step-0 TrainState around existing parameters (placed onto the training shardings)."""
  expected = setup.abstract_state.params
  got_shapes = jax.tree.map(lambda a: tuple(a.shape), params)
  want_shapes = jax.tree.map(lambda a: tuple(a.shape), expected)
  if jax.tree.structure(got_shapes) != jax.tree.structure(want_shapes) or got_shapes != want_shapes:
    from flax import traverse_util

    got = traverse_util.flatten_dict(got_shapes, sep="/")
    want = traverse_util.flatten_dict(want_shapes, sep="/")
    diff = sorted(set(got) ^ set(want))[:8] + [k for k in got if k in want and got[k] != want[k]][:8]
    raise ValueError(f"config.checkpoint.init_from parameters do not match the model of config.model: {diff}")
  params = jax.tree.map(lambda p, s: jax.device_put(jnp.asarray(p, s.dtype), s.sharding), params, expected)

  def make(params):
    return new_train_state(params, setup.tx.init(params), jax.random.key(seed))

  with _MeshContext(setup):
    return jax.jit(
      make, out_shardings=setup.state_shardings, donate_argnums=0, compiler_options=init_compiler_options(setup.config)
    )(params)


def load_init_params(path: str, setup: Setup):
  """Parameters of a HF checkpoint or of one of our checkpoints (nvlm_jax.models.load_model)."""
  cfg = setup.model_config
  param_dtype = setup.config.model.get("param_dtype") or "float32"
  dtype = setup.config.model.get("dtype") or "float32"  # the compute dtype: it does not change the params
  _, params = models.load_model(
    path, dtype=dtype, param_dtype=param_dtype, mesh=setup.mesh, scan_layers=_scan_layers(cfg)
  )
  return params


def _scan_layers(model_config) -> bool:
  llm = getattr(model_config, "llm", model_config)
  return getattr(llm, "scan_layers", True)


# --- the loop --------------------------------------------------------------------------------------


class Trainer:
  """Owns the setup, the state, the data iterator, the checkpointer and the metrics writer."""

  def __init__(self, config, *, devices=None, data_iterator: Iterator | None = None, workdir: str | None = None):
    self.config = config
    self.workdir = os.path.abspath(workdir or config.workdir)
    model_config = models.model_config_from_settings(config.model)
    self.processor = None
    if data_iterator is None:  # the pipeline's processor fixes the model's token ids
      self.processor, self.processor_kwargs, model_config = make_processor(config, model_config, self.workdir)
    self.setup = build_setup(config, devices=devices, model_config=model_config)
    self.data_iterator = data_iterator
    self.step_fn = jitted_train_step(self.setup)
    self.is_chief = jax.process_index() == 0

  def step_flops(self) -> float | None:
    if not hasattr(self, "_flops"):
      flops = model_flops_per_step(self.setup)
      self._flops = None if flops is None else flops["total"]
    return self._flops

  def run(self) -> list[dict]:
    """Trains to config.total_steps (resuming from the latest checkpoint); returns the logged metrics."""
    cfg, setup = self.config, self.setup
    ckpt_cfg = cfg.checkpoint
    os.makedirs(self.workdir, exist_ok=True)
    run_identity.claim(self.workdir, cfg, write=self.is_chief)  # refuses another run's checkpoints
    if self.is_chief:
      run_config.save_train_config(self.workdir, cfg)  # evaluation reads the run's data settings from it
    description = models.describe_model(setup.model_config)
    orbax_checkpoint.write_model_description(self.workdir, description)
    checkpointer = checkpointing.TrainCheckpointer(
      self.workdir,
      max_to_keep=ckpt_cfg.max_to_keep,
      save_interval_steps=ckpt_cfg.every_steps,
      async_save=ckpt_cfg.get("async_save", True),
    )
    owns_iterator = self.data_iterator is None
    if owns_iterator:
      if self.processor is not None:
        processor_setup.save_processor(self.workdir, self.processor, self.processor_kwargs)
      self.data_iterator = make_data_iterator(cfg, setup, self.processor)

    t0 = time.perf_counter()
    state, how, resumed = self._initial_state(checkpointer)
    start = int(jax.device_get(state.step))
    n_train = optimizer.count_params(state.params, setup.labels)
    n_all = optimizer.count_params(state.params)
    writer = metrics_lib.MetricsWriter(
      self.workdir,
      enabled=self.is_chief,
      tensorboard=cfg.log.get("tensorboard", True),
      resume_step=start if resumed else None,
    )
    for line in writer.repaired:
      self._say(f"log brought to the restored step {start}: {line}")
    self._say(
      f"{how} in {time.perf_counter() - t0:.1f}s: step {start}, {n_all:,} params "
      f"({n_train:,} trainable), mesh {dict(setup.mesh.shape)}, {jax.process_count()} process(es)"
    )

    total = int(cfg.total_steps)
    log_every = max(int(cfg.log.get("every_steps", 1)), 1)
    if start >= total:
      self._say(
        f"nothing to do: the checkpoint is at step {start} >= total_steps={total} "
        f"(raise --config.total_steps, or use a new workdir)"
      )
    else:
      with _MeshContext(setup):
        t0 = time.perf_counter()
        compiled = self.step_fn.lower(setup.abstract_state, abstract_global_batch(setup)).compile()
        self._say(f"compiled the train step in {time.perf_counter() - t0:.1f}s")

    history, pending = [], []
    step, window_start = start, time.perf_counter()
    try:
      while step < total:
        try:
          local = next(self.data_iterator)
        except StopIteration:
          self._say(f"the data iterator is exhausted after step {step}; stopping early")
          if pending:
            history += self._log_window(pending, window_start, writer, total, checkpointer, durable=True)
          if step > start and checkpointer.latest_step() != step:
            self._save(checkpointer, step, state, description)
          break
        if step == start:  # the first batch of the run is checked against the contract, on the host
          check_local_batch(local, setup)
        state, step_metrics = compiled(state, to_global_batch(local, setup))
        step += 1
        pending.append((step, step_metrics))
        # Saved after the step whose state it holds; the iterator is positioned just after its batch. The
        # rows of every step up to it are on disk first, so a checkpoint never holds steps the log lacks.
        save_due = checkpointer.due(step, force=step == total)
        if save_due or step % log_every == 0:
          history += self._log_window(pending, window_start, writer, total, checkpointer, durable=save_due)
          pending, window_start = [], time.perf_counter()
        if save_due:
          self._save(checkpointer, step, state, description)
    finally:
      checkpointer.close()
      writer.close()
      if owns_iterator and hasattr(self.data_iterator, "close"):
        self.data_iterator.close()
    self.state = state
    return history

  def _initial_state(self, checkpointer):
    """(state, how it was made, whether it resumed a checkpoint of this workdir).

    A workdir with checkpoints always resumes (that is how a preempted job continues), from the newest
    intact step: damaged newer ones are reported and moved to WORKDIR/damaged_checkpoints/. With none
    intact it stops (NoIntactCheckpointError lists them); it never uses part of a checkpoint.
    """
    setup, cfg = self.setup, self.config
    init_from = cfg.checkpoint.get("init_from")
    latest = checkpointer.latest_step()
    if latest is not None and init_from:
      self._say(
        f"WARNING: config.checkpoint.init_from={init_from} is NOT used: {checkpointer.directory} already "
        f"holds checkpoints (steps {checkpointer.all_steps()}), and a workdir with checkpoints always "
        "resumes from them. To start from init_from, use a new workdir."
      )
    if latest is not None and checkpointer.is_params_only(latest):
      # A params-only checkpoint in the workdir (a stitched model saved here): start from it.
      state = state_from_params(setup, load_init_params(self.workdir, setup), cfg.seed)
      state = state.replace(step=jnp.asarray(latest, jnp.int32))
      return state, f"initialized from the parameters of {checkpointer.directory}/{latest}", False
    if latest is not None:
      state, step, damaged = checkpointer.restore_newest_intact(setup.abstract_state, self.data_iterator)
      for path, reason in damaged:
        self._say(f"WARNING: checkpoint {path} is damaged ({reason}); resuming from step {step} instead")
      if damaged:
        moved = checkpointer.set_aside([path for path, _ in damaged])
        self._say(f"moved the damaged checkpoint(s) aside for inspection: {', '.join(map(str, moved))}")
      return state, f"resumed from {checkpointer.directory}/{step}", True
    if init_from:
      state = state_from_params(setup, load_init_params(init_from, setup), cfg.seed)
      return state, f"initialized from {init_from}", False
    return fresh_state(setup, cfg.seed), "random init", False

  def _save(self, checkpointer, step: int, state, description) -> None:
    if not checkpointer.save(step, state, self.data_iterator, description):
      self._say(f"WARNING: not saving the checkpoint of step {step}: a parameter is not finite")

  def _log_window(
    self, pending, window_start: float, writer, total: int, checkpointer, durable: bool = False
  ) -> list[dict]:
    """Fetches the metrics of the steps since the last log line (one device->host transfer, which also
    waits for them to finish: the window's time is measured after it), writes them (`durable`: onto the
    disk), prints a progress line, and aborts on a run of non-finite steps."""
    cfg = self.config
    fetched = jax.device_get([m for _, m in pending])
    step_time = (time.perf_counter() - window_start) / len(pending)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops = self.step_flops()
    peak = float(cfg.log.get("peak_tflops_per_device", 0.0)) * 1e12
    rows = []
    for (step, _), m in zip(pending, fetched):
      row = {k: float(v) if np.issubdtype(np.asarray(v).dtype, np.floating) else int(v) for k, v in m.items()}
      row.update(
        step_time_s=step_time, tokens_per_s=tokens_per_step / step_time, samples_per_s=row.pop("samples") / step_time
      )
      if flops is not None:
        row["tflops_per_step"] = flops / 1e12
        if peak:
          row["mfu"] = flops_lib.mfu(flops, step_time, self.setup.mesh.devices.size, peak)
      writer.write(step, row)
      rows.append({"step": step, **row})
    writer.flush(durable)
    last = rows[-1]
    finite = [r["loss"] for r in rows if np.isfinite(r["loss"])]
    extra = f" | gnorm {last['grad_norm']:.3g} | lr {last['learning_rate']:.3g}"
    if "mfu" in last:
      extra += f" | MFU {100 * last['mfu']:.1f}%"
    if last["skipped_steps"]:
      extra += f" | skipped {last['skipped_steps']}"
    self._say(
      metrics_lib.progress_line(
        last["step"], total, float(np.mean(finite)) if finite else float("nan"), last["tokens_per_s"], step_time, extra
      )
    )
    max_bad = int(cfg.get("max_consecutive_nonfinite", 5))
    worst = max(rows, key=lambda r: r["nonfinite_streak"])
    if worst["nonfinite_streak"] >= max_bad:
      # The first skipped step was computed from the parameters the step before it made: a checkpoint of
      # that step (or later) holds parameters that gave a non-finite loss. Name the newest one before it.
      first_bad = worst["step"] - worst["nonfinite_streak"] + 1
      checkpointer.wait()
      good = [s for s in checkpointer.all_steps() if s <= first_bad - 2]
      where = (
        f"the last checkpoint whose parameters still gave a finite loss: {checkpointer.directory}/{max(good)}"
        if good
        else "no checkpoint predates it (start again, e.g. with a lower config.optimizer.lr)"
      )
      raise NonFiniteLossError(
        f"{worst['nonfinite_streak']} consecutive steps (up to step {worst['step']}) had a non-finite loss or "
        f"gradient norm, or an update that would make the parameters non-finite; their updates were skipped "
        f"({worst['skipped_steps']} skipped in total). Aborting: check the data of these steps, lower "
        f"config.optimizer.lr, or raise config.max_consecutive_nonfinite (now {max_bad}). The streak began "
        f"at step {first_bad}; {where}"
      )
    return rows

  def _say(self, line: str) -> None:
    if self.is_chief:
      metrics_lib.log_progress(line)


def train(config, **kwargs) -> list[dict]:
  return Trainer(config, **kwargs).run()
