"""The bench/ scripts run from a fresh install and their built-in parity checks hold (timings are not judged).

Each script runs as its own process at a tiny size, one timed repeat, on one CPU device (the suite's
8 virtual devices are not passed on), with its own compilation cache, and must print JSON whose sanity fields
say ours and the reference agree: same losses, gradient norms and trajectory after updates, identical greedy
tokens. The derived figures (throughput, speedups, MFU, orderings) are checked against the raw timings the
same JSON reports, so a wrong formula fails even though the timings themselves vary.
"""

import json
from pathlib import Path

import child_processes
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
DIGITS = 2e-3  # the scripts round every float to 4 significant digits


def run_bench(script: str, *args: str, tmp_path: Path) -> dict:
  out = tmp_path / f"{script}.json"
  log = tmp_path / f"{script}.log"
  env = child_processes.child_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  command = child_processes.python(str(BENCH / script), "--repeats", "1", "--out", str(out), *args)
  code = child_processes.run(command, log, env=env, timeout_s=600)
  assert code == 0, f"{script} failed:\n{child_processes.tail(log)}"
  result = json.loads(out.read_text())
  assert result["machine"]["jax_device_kind"] and result["machine"]["cpu_cores"] >= 1  # names what it ran on
  return result


def assert_speedup_is_reference_over_ours(speedup: dict, ours: dict, reference: dict):
  assert speedup["of_medians"] == pytest.approx(reference["median_s"] / ours["median_s"], rel=DIGITS)


@pytest.mark.slow
def test_train_step_bench_agrees_with_torch(tmp_path):
  r = run_bench("train_step_vs_torch.py", "--batch", "1", "--seq-len", "128", "--sanity-steps", "2", tmp_path=tmp_path)
  assert r["sanity"]["agree"], r["sanity"]
  steps = r["train_step"]
  for name in ("ours", "ours_unrolled", "reference"):
    assert steps[name]["samples_per_s"] == pytest.approx(1 / steps[name]["median_s"], rel=DIGITS)  # batch 1
  assert_speedup_is_reference_over_ours(steps["speedup_ours_vs_reference"], steps["ours"], steps["reference"])
  assert_speedup_is_reference_over_ours(
    steps["speedup_ours_unrolled_vs_reference"], steps["ours_unrolled"], steps["reference"]
  )


def test_generate_bench_tokens_identical_to_torch(tmp_path):
  batch, new_tokens = 2, 8
  r = run_bench(
    "generate_vs_torch.py",
    "--batch",
    str(batch),
    "--prompt-len",
    "96",
    "--new-tokens",
    str(new_tokens),
    "--no-memory",  # the peak-memory child builds a 200 MB model: a benchmark figure, too slow for the suite
    tmp_path=tmp_path,
  )
  sanity = r["sanity"]
  assert sanity["identical"] and sanity["unrolled_identical"] and sanity["scanned_sliced_identical"], sanity
  assert sanity["prefill_first_token_identical"] and r["summary"]["tokens_identical"], sanity
  for name in ("ours", "ours_unrolled", "ours_scanned_sliced", "reference"):
    assert r[name]["tokens_per_s"] == pytest.approx(batch * new_tokens / r[name]["median_s"], rel=DIGITS)
    # one repeat: the decode step is exactly (whole - prefill) / (new_tokens - 1)
    step_s = (r[name]["median_s"] - r[name]["prefill_median_s"]) / (new_tokens - 1)
    assert r[name]["decode_step_median_ms"] == pytest.approx(1e3 * step_s, rel=5 * DIGITS, abs=1e-3)
  assert_speedup_is_reference_over_ours(r["speedup_ours_vs_reference"], r["ours"], r["reference"])
  floor = r["weight_streaming_floor"]
  assert floor["floor_ms"] == pytest.approx(
    floor["language_weight_mb"] * 2**20 / (floor["host_streaming_gb_per_s"] * 1e9) * 1e3, rel=5 * DIGITS
  )
  assert floor["decode_step_over_floor"]["ours"] == pytest.approx(
    r["ours"]["decode_step_median_ms"] / floor["floor_ms"], rel=5 * DIGITS
  )


@pytest.mark.slow
def test_mfu_and_fusion_benches_report_their_figures(tmp_path):
  mfu = run_bench(
    "mfu.py",
    "--hidden",
    "128",
    "--layers",
    "1",
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--intermediate",
    "256",
    "--seq-len",
    "128",
    "--peak-n",
    "256",
    tmp_path=tmp_path,
  )
  flops = mfu["flops_per_step"]
  assert 0.9 < flops["xla_over_analytic"] < 1.2  # the analytic count is what XLA runs
  step_s, peak = mfu["train_step"]["median_s"], mfu["peak"]["median_flops_per_s"]
  assert mfu["achieved_flops_per_s"]["analytic"] == pytest.approx(flops["analytic"]["total"] / step_s, rel=DIGITS)
  assert mfu["mfu_analytic"]["of_medians"] == pytest.approx(flops["analytic"]["total"] / step_s / peak, rel=DIGITS)

  fusion = run_bench("fusion_throughput.py", "--scale", "16", "--layers", "2", "--every", "1", tmp_path=tmp_path)
  steps = fusion["train_step"]
  assert set(steps) == {"d", "x", "h"} and set(fusion["ratios_vs_D"]) == {"X/D", "H/D"}
  for v in ("x", "h"):
    ratio = fusion["ratios_vs_D"][f"{v.upper()}/D"]
    assert ratio["measured_of_medians"] == pytest.approx(steps["d"]["median_s"] / steps[v]["median_s"], rel=DIGITS)
    assert ratio["measured_over_paper"] == pytest.approx(
      ratio["measured_median_of_paired"] / ratio["paper"], rel=DIGITS
    )
  fastest_first = sorted(steps, key=lambda v: -steps[v]["samples_per_s"])
  assert fusion["ordering_fastest_first"] == [v.upper() for v in fastest_first]
  assert fusion["ordering_matches_paper"] == (fusion["ordering_fastest_first"] == fusion["paper_ordering"])
