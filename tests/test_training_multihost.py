"""Two processes x 2 CPU devices (localhost coordinator) train like one process with 4 devices.

The reference runs in the test process on 4 of conftest's 8 devices while the two subprocesses train.

Each process reads only its own rows of every global batch (process_index / process_count reach the data
factory), the trainer assembles global arrays with `jax.make_array_from_process_local_data`, and both
processes write the checkpoints together.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import child_processes
import numpy as np
import portpicker

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def command(workdir: Path, cpu_devices: int, *extra: str) -> list[str]:
  return [
    sys.executable,
    str(REPO / "train.py"),
    "--config",
    str(REPO / "configs" / "tiny_lm.py"),
    f"--config.workdir={workdir}",
    f"--config.total_steps={STEPS}",
    "--config.checkpoint.every_steps=3",
    "--config.log.every_steps=1",
    "--config.log.tensorboard=False",
    "--config.optimizer.warmup_steps=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    f"--config.distributed.num_cpu_devices={cpu_devices}",
    *extra,
  ]


def env() -> dict:
  return child_processes.child_env(XLA_FLAGS="--xla_backend_optimization_level=0")  # not conftest's 8 devices


def reference_run(workdir: Path) -> list[dict]:
  """The same training in this process, one process with 4 devices."""
  import importlib.util

  import jax

  from nvlm_jax.training import trainer

  spec = importlib.util.spec_from_file_location("tiny_lm", REPO / "configs" / "tiny_lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.update(workdir=str(workdir), total_steps=STEPS, compiler_options={"xla_backend_optimization_level": 0})
  c.checkpoint.every_steps = 3
  c.log.update(every_steps=1, tensorboard=False)
  c.optimizer.warmup_steps = 2
  c.mesh.update(data=1, fsdp=2, tensor=2)
  return trainer.Trainer(c, devices=jax.devices()[:4]).run()


def losses(workdir: Path) -> list[float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  return [r["loss"] for r in rows]


def test_two_processes_match_one_process(tmp_path):
  port = portpicker.pick_unused_port()
  multi_dir = tmp_path / "two_processes"
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  with contextlib.ExitStack() as children:  # both are stopped and reaped however the test ends
    procs = [
      children.enter_context(
        child_processes.running(
          command(
            multi_dir,
            2,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
          ),
          logs[i],
          env=env(),
        )
      )
      for i in range(2)
    ]
    reference = [h["loss"] for h in reference_run(tmp_path / "one_process")]
    for i, p in enumerate(procs):
      assert child_processes.wait(p, logs[i], timeout_s=600) == 0, f"process {i}:\n" + child_processes.tail(logs[i])
  output = logs[0].read_text()
  assert "2 process(es)" in output and "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in output
  data_files = sorted(f for f in os.listdir(multi_dir / "checkpoints" / str(STEPS) / "data") if "process" in f)
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]  # one iterator state per process
  np.testing.assert_allclose(losses(multi_dir), reference, rtol=1e-5)
