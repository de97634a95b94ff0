"""Held-out accuracy per question type against training steps, from the checkpoints a run kept.

    python train.py --config.checkpoint.every_steps=250 --config.checkpoint.max_to_keep=100
    python -m nvlm_jax.studies.learning_curve /tmp/nvlm_tiny_d [--samples 500] [--out DIR]

Every checkpoint in WORKDIR/checkpoints/ is asked the synthetic benchmark's held-out questions (the run's own
scene settings, the benchmark's held-out seed); DIR (default WORKDIR/learning_curve) receives
`learning_curve.json` (step -> the benchmark's summary) and `learning_curve.png`. A step already in the JSON
is not evaluated again, so rerunning after more training adds only the new checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nvlm_jax.checkpoint.orbax_checkpoint import CHECKPOINT_SUBDIR, checkpoint_steps
from nvlm_jax.evaluation import synthetic
from nvlm_jax.studies.report import QUESTION_TYPES, plt
from nvlm_jax.studies.runner import write_json_atomic

CURVE_FILE = "learning_curve.json"


def evaluate_steps(workdir: Path, out: Path, *, num_samples: int) -> dict[int, dict]:
  """step -> synthetic benchmark summary for every checkpoint; results already in OUT are reused."""
  path = out / CURVE_FILE
  curve = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
  curve = {step: s for step, s in curve.items() if s.get("num_samples") == num_samples}
  steps = checkpoint_steps(workdir / CHECKPOINT_SUBDIR)
  if not steps:
    raise FileNotFoundError(
      f"{workdir / CHECKPOINT_SUBDIR}: no checkpoints (train with --config.checkpoint.every_steps to keep some)"
    )
  for step in steps:
    if step in curve:
      continue
    summary = synthetic.evaluate_checkpoint(workdir / CHECKPOINT_SUBDIR / str(step), num_samples=num_samples)
    curve[step] = {k: v for k, v in summary.items() if k != "predictions_file"}
    accuracy = ", ".join(f"{t} {v['accuracy']:.1%}" for t, v in summary["per_type"].items())
    print(f"step {step}: overall {summary['accuracy']:.1%} ({accuracy})", flush=True)
    write_json_atomic(path, {str(k): curve[k] for k in sorted(curve)})
  return dict(sorted(curve.items()))


def plot_curve(curve: dict[int, dict], path: Path, title: str) -> None:
  """One line per question type plus the overall accuracy, against the training step."""
  steps = sorted(curve)
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.plot(steps, [curve[s]["accuracy"] for s in steps], "k-o", linewidth=2.2, markersize=4, label="overall")
  for qtype in QUESTION_TYPES:
    points = [(s, curve[s]["per_type"][qtype]["accuracy"]) for s in steps if qtype in curve[s]["per_type"]]
    if points:
      ax.plot(*zip(*points), "-o", markersize=3, label=qtype)
  ax.set_ylim(0, 1)
  ax.set_xlabel("training step")
  ax.set_ylabel("held-out accuracy (exact match)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m nvlm_jax.studies.learning_curve", description=__doc__.split("\n")[0])
  parser.add_argument("workdir", type=Path, help="a training workdir (its checkpoints/ are evaluated)")
  parser.add_argument("--samples", type=int, default=500, help="held-out samples per checkpoint (default 500)")
  parser.add_argument("--out", type=Path, default=None, help="output directory (default WORKDIR/learning_curve)")
  args = parser.parse_args(argv)
  out = args.out or args.workdir / "learning_curve"
  out.mkdir(parents=True, exist_ok=True)
  try:
    curve = evaluate_steps(args.workdir, out, num_samples=args.samples)
  except FileNotFoundError as e:
    parser.error(str(e))
  plot_curve(curve, out / "learning_curve.png", f"{args.workdir.name}: {args.samples} held-out samples per checkpoint")
  print(f"wrote {out / CURVE_FILE} and {out / 'learning_curve.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
