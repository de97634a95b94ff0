"""python -m nvlm_jax.studies STUDY --out DIR [--seeds 3] [--steps N] [--eval-samples N] [--arms A,B] | --list"""

from __future__ import annotations

import argparse
import sys

from nvlm_jax.studies.definitions import STUDIES


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m nvlm_jax.studies",
    description="Run one of the paper's ablations in miniature (docs/miniature.md). Rerunning resumes.",
  )
  parser.add_argument("study", nargs="?", choices=list(STUDIES), help="the study to run")
  parser.add_argument("--out", help="results directory (OUT/STUDY/results.json, OUT/STUDY/STUDY.png)")
  parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (0 .. N-1); default 3")
  parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the study's)")
  parser.add_argument("--eval-samples", type=int, default=None, help="held-out samples (default: the study's)")
  parser.add_argument("--arms", default="", help="comma-separated subset of the study's arms")
  parser.add_argument("--list", action="store_true", help="list the studies with their arms and defaults")
  args = parser.parse_args(argv)
  if args.list:
    for s in STUDIES.values():
      print(f"{s.name:15s} {s.title} ({s.paper})")
      print(f"{'':15s} arms: {', '.join(a.name for a in s.arms)}")
      print(f"{'':15s} default --steps {s.default_steps} --eval-samples {s.default_eval_samples}")
    return 0
  if not args.study or not args.out:
    parser.error("give a STUDY and --out DIR (or --list)")

  from absl import logging  # the training stack's libraries log through absl: keep their INFO lines out

  logging.set_verbosity(logging.WARNING)
  from nvlm_jax.studies.runner import StudyRunner  # JAX loads only when a study runs, not for --list

  arms = [a for a in args.arms.split(",") if a] or None
  try:
    runner = StudyRunner(
      args.study, args.out, seeds=args.seeds, steps=args.steps, eval_samples=args.eval_samples, arms=arms
    )
    runner.check_finished_runs()
  except (KeyError, ValueError) as e:  # an unknown arm, a bad number, another run's settings in --out
    parser.error(str(e).strip("'\""))
  summary = runner.run()
  return 1 if summary["failures"] else 0


if __name__ == "__main__":
  sys.exit(main())
