"""Trainer features a user turns on by config, each checked against an independent oracle.

init_from (perturbed parameters, not the fresh init), max_to_keep pruning, load_pretrained of a workdir,
the MFU / throughput values on a mesh smaller than the host, remat policies (same losses and updates,
and the remat really in the step), bf16 compute with fp32 master weights, and the planner's command line.
One tiny text-only LM (tests/test_training.py's), one trained workdir shared by the tests that read it.
"""

import io
import re

import child_processes
import jax
import numpy as np
import pytest
from test_training import BATCH, SEQ, Runner, lm_batches, lm_config

from nvlm_jax.training import config_base, trainer

STEPS = 5


@pytest.fixture(scope="module")
def reference():
  """The fp32 tiny LM on one device, compiled once for this module."""
  return Runner(lm_config(), jax.devices()[:1])


def run_from(runner: Runner, params, steps: int):
  """`steps` train steps from `params` (fresh optimizer state) with the reference's compiled step."""
  initial = runner.initial.replace(params=params)
  state = jax.device_put(initial, runner.setup.state_shardings)
  batches, history = lm_batches(), []
  for _ in range(steps):
    state, metrics = runner.step(state, trainer.to_global_batch(next(batches), runner.setup))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), [float(m["loss"]) for m in history]


# --- init_from -------------------------------------------------------------------------------------


def test_init_from_starts_from_the_saved_parameters_not_a_fresh_init(tmp_path, reference):
  from nvlm_jax.models import save_checkpoint

  rng = np.random.default_rng(0)
  perturbed = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(a.dtype), reference.initial.params)
  save_checkpoint(tmp_path / "perturbed", reference.setup.model_config, perturbed)
  config = lm_config(total_steps=2, workdir=str(tmp_path / "run"))
  config.checkpoint.init_from = str(tmp_path / "perturbed")
  config.log.update(every_steps=1, tensorboard=False)
  history = trainer.Trainer(config, devices=jax.devices()[:1], data_iterator=lm_batches()).run()

  _, expected = run_from(reference, perturbed, 2)
  _, fresh = run_from(reference, reference.initial.params, 2)
  assert abs(expected[0] - fresh[0]) > 1e-3, "the perturbation must change the loss for this test to mean anything"
  np.testing.assert_allclose([h["loss"] for h in history], expected, rtol=1e-6)


# --- one trained workdir: max_to_keep, load_pretrained, metric values --------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """STEPS steps on a mesh of 2 of the 8 devices, a checkpoint every step, max_to_keep=2, MFU against a
  1 TFLOP/s peak."""
  workdir = tmp_path_factory.mktemp("trained")
  config = lm_config(total_steps=STEPS, workdir=str(workdir))
  config.log.update(every_steps=1, tensorboard=False, peak_tflops_per_device=1.0)
  config.checkpoint.update(every_steps=1, max_to_keep=2)
  run = trainer.Trainer(config, devices=jax.devices()[:2], data_iterator=lm_batches())
  history = run.run()
  return workdir, run, history


def test_max_to_keep_prunes_all_but_the_latest_checkpoints(trained):
  workdir, _, _ = trained
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [STEPS - 1, STEPS]


def test_load_pretrained_of_a_workdir_equals_load_checkpoint_and_the_trained_state(trained):
  import nvlm_jax
  from nvlm_jax import models

  workdir, run, _ = trained
  model_a, params_a = nvlm_jax.load_pretrained(workdir)
  model_b, params_b = models.load_checkpoint(workdir)
  assert model_a.config == model_b.config
  final = jax.device_get(run.state.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_a), final)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_b), final)


def independent_flop_count(config) -> float:
  """Model FLOPs of one step of the tiny LM, by hand from docs/training.md's convention: the decoder and LM head
  train (6 x weight-matmul params x tokens), causal attention 4 * L^2/2 * width per layer and row, x3 with the
  backward; the frozen embedding is a lookup."""
  d = config.model.decoder
  head_dim = d.hidden_size // d.num_heads
  per_layer = (
    d.hidden_size * d.num_heads * head_dim * 2  # q, o
    + d.hidden_size * d.num_kv_heads * head_dim * 2  # k, v
    + 3 * d.hidden_size * d.intermediate_size  # SwiGLU
  )
  matmul_params = d.num_layers * per_layer + d.hidden_size * d.vocab_size  # + LM head
  tokens = BATCH * SEQ
  attention = d.num_layers * BATCH * 4 * (SEQ * SEQ / 2) * d.num_heads * head_dim
  return 6 * matmul_params * tokens + 3 * attention


def test_throughput_and_mfu_values_use_the_devices_of_the_mesh(trained):
  _, run, history = trained
  assert run.setup.mesh.devices.size == 2 and jax.device_count() == 8
  flops = independent_flop_count(run.config)
  for row in history:
    step_s = row["step_time_s"]
    assert row["tflops_per_step"] == pytest.approx(flops / 1e12, rel=1e-9)
    assert row["tokens_per_s"] == pytest.approx(BATCH * SEQ / step_s, rel=1e-9)
    assert row["mfu"] == pytest.approx(flops / step_s / (2 * 1e12), rel=1e-9)  # 2 devices of 1 TFLOP/s peak


# --- remat ---------------------------------------------------------------------------------------------


REMAT = re.compile(r"\b(remat2|checkpoint)\[")  # the jaxpr primitive of jax.checkpoint / nn.remat


def step_jaxpr(runner: Runner) -> str:
  with trainer._MeshContext(runner.setup):
    step = trainer.jitted_train_step(runner.setup)
    return str(step.trace(runner.setup.abstract_state, trainer.abstract_global_batch(runner.setup)).jaxpr)


@pytest.mark.parametrize(
  "policy, saved", [("full", "nothing_saveable"), ("dots", "DotsSaveable(only_if_no_batch_dims=False)")]
)
def test_remat_policy_is_in_the_step_and_changes_no_loss_or_update(reference, policy, saved):
  config = lm_config()
  config.model.remat = {"llm": policy}
  remat = Runner(config, jax.devices()[:1])
  text = step_jaxpr(remat)
  assert REMAT.search(text) and saved in text, f"remat policy {policy!r} is not in the train step"
  assert not REMAT.search(step_jaxpr(reference))
  state_r, hist_r = remat.run(lm_batches(), 2)
  state_0, hist_0 = reference.run(lm_batches(), 2)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([float(m[key]) for m in hist_r], [float(m[key]) for m in hist_0], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    jax.device_get(state_r.params),
    jax.device_get(state_0.params),
  )


# --- bf16 compute, fp32 master weights ----------------------------------------------------------------


def test_bf16_compute_tracks_fp32_and_keeps_fp32_master_weights(reference):
  config = lm_config()
  config.model.update(dtype="bfloat16", param_dtype="float32")
  bf16 = Runner(config, jax.devices()[:1])
  state_b, hist_b = bf16.run(lm_batches(), 4)
  _, hist_f = reference.run(lm_batches(), 4)
  loss_b, loss_f = [float(m["loss"]) for m in hist_b], [float(m["loss"]) for m in hist_f]
  np.testing.assert_allclose(loss_b, loss_f, rtol=2e-2)  # bf16 keeps ~3 significant digits
  assert loss_b != loss_f, "identical to fp32: the step did not compute in bf16"
  dtypes = {str(a.dtype) for a in jax.tree.leaves(jax.device_get(state_b.params))}
  moments = {str(a.dtype) for a in jax.tree.leaves(state_b.opt_state) if getattr(a, "ndim", 0) > 0}
  assert dtypes == {"float32"} and moments == {"float32"}, (dtypes, moments)
  assert loss_b[-1] < loss_b[0]


# --- the planner's command line ------------------------------------------------------------------------


def without_timings(text: str) -> list[str]:
  return [line for line in text.splitlines() if line and not re.search(r"\bin [\d.]+s\b", line)]


def test_planner_cli_plans_the_mesh_it_is_given(tmp_path):
  """`python -m nvlm_jax.training.plan` (own process, own virtual devices) prints what plan.plan() prints for the
  same config, mesh and overrides; a malformed --mesh is refused naming the entry."""
  from nvlm_jax.training import plan

  config_file = child_processes.REPO / "configs" / "tiny_d.py"
  log = tmp_path / "plan.log"
  command = child_processes.python(
    "-m",
    "nvlm_jax.training.plan",
    f"--config={config_file}",
    "--mesh=fsdp=2,tensor=2",
    "--lower_only",
    "--config.data.global_batch_size=4",
  )
  code = child_processes.run(command, log, env=child_processes.child_env(), timeout_s=600)
  assert code == 0, child_processes.tail(log)
  c = config_base.sibling_config(str(config_file), "tiny_d")
  c.mesh.update(data=1, fsdp=2, tensor=2)
  c.data.global_batch_size = 4
  expected = io.StringIO()
  plan.plan(c, lower_only=True, devices=jax.devices()[:4], out=expected)
  printed = without_timings(log.read_text())
  assert "= 4 devices" in printed[-len(without_timings(expected.getvalue())) :][0]
  assert printed[-len(without_timings(expected.getvalue())) :] == without_timings(expected.getvalue())

  bad = tmp_path / "bad.log"
  code = child_processes.run(command[:4] + ["--mesh=fsdp:2"], bad, env=child_processes.child_env(), timeout_s=600)
  assert code != 0 and "'fsdp:2'" in bad.read_text()
