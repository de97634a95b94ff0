"""The bench/ scripts run from a fresh install and their built-in parity checks hold (timings are not judged).

Each script runs as its own process at a tiny size, one timed repeat, on one CPU device (the suite's
8 virtual devices are not passed on), and must print JSON whose sanity fields say ours and the reference
agree: same losses, gradient norms and trajectory after updates, identical greedy tokens.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str, tmp_path: Path) -> dict:
  out = tmp_path / f"{script}.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(BENCH / script), "--repeats", "1", "--out", str(out), *args],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
  result = json.loads(out.read_text())
  assert result["machine"]["jax_device_kind"] and result["machine"]["cpu_cores"] >= 1  # names what it ran on
  return result


@pytest.mark.slow
def test_train_step_bench_agrees_with_torch(tmp_path):
  r = run_bench("train_step_vs_torch.py", "--batch", "1", "--seq-len", "128", "--sanity-steps", "2",
                tmp_path=tmp_path)
  assert r["sanity"]["agree"], r["sanity"]
  assert r["train_step"]["ours"]["median_s"] > 0 and r["train_step"]["reference"]["median_s"] > 0
  assert {"speedup_ours_vs_reference", "speedup_ours_unrolled_vs_reference"} <= set(r["train_step"])


@pytest.mark.slow
def test_generate_bench_tokens_identical_to_torch(tmp_path):
  r = run_bench("generate_vs_torch.py", "--batch", "2", "--prompt-len", "96", "--new-tokens", "8",
                tmp_path=tmp_path)
  assert r["sanity"]["identical"] and r["sanity"]["unrolled_identical"], r["sanity"]
  assert r["ours"]["tokens_per_s"] > 0 and r["reference"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_mfu_and_fusion_benches_report_their_figures(tmp_path):
  mfu = run_bench("mfu.py", "--hidden", "128", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                  "--intermediate", "256", "--seq-len", "128", "--peak-n", "256", tmp_path=tmp_path)
  assert 0.9 < mfu["flops_per_step"]["xla_over_analytic"] < 1.2  # the analytic count is what XLA runs
  assert mfu["mfu_analytic"]["median_of_paired"] > 0
  fusion = run_bench("fusion_throughput.py", "--scale", "16", "--layers", "2", "--every", "1", tmp_path=tmp_path)
  assert set(fusion["train_step"]) == {"d", "x", "h"}
  assert set(fusion["ratios_vs_D"]) == {"X/D", "H/D"}
  assert fusion["paper_ordering"] == ["X", "H", "D"]
