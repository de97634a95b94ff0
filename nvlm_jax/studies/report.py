"""A study's summary: per arm the per-seed results and their mean and spread; a PNG of the same.

Spread is the sample standard deviation over seeds (ddof 1; 0 with one seed) and the min-max range. A
difference between two arms smaller than their spread is not a finding: docs/miniature.md reads the
tables that way.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the machines the studies run on

import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402

from nvlm_jax.data.synthetic import QUESTION_TYPES  # noqa: E402 (the benchmark's order of the types)

SPEED_METRICS = ("samples_per_s", "decoder_tokens_per_sample")


def spread(values) -> dict:
  """mean, std (ddof 1; 0 for a single value), min, max and n of a list of numbers."""
  values = np.asarray(list(values), dtype=np.float64)
  if values.size == 0:
    raise ValueError("spread() of no values")
  return {
    "mean": float(values.mean()),
    "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
    "min": float(values.min()),
    "max": float(values.max()),
    "n": int(values.size),
  }


def speed_metrics(study) -> tuple[str, ...]:
  """The training-speed figures a study's table and plot show: the fusion study's question is speed too."""
  return SPEED_METRICS if study.name == "fusion" else ()


def question_types(runs: list[dict]) -> list[str]:
  """The benchmark's question types in its order, then any others the results hold."""
  seen = {t for r in runs for t in r["per_type"]}
  return [t for t in QUESTION_TYPES if t in seen] + sorted(seen - set(QUESTION_TYPES))


def aggregate(runs: list[dict]) -> dict:
  """Mean and spread over seeds of the overall accuracy, each question type's, and the speed figures."""
  out = {"accuracy": spread(r["accuracy"] for r in runs), "per_type": {}}
  for qtype in question_types(runs):
    values = [r["per_type"][qtype] for r in runs if qtype in r["per_type"]]
    out["per_type"][qtype] = spread(values)
  for key in SPEED_METRICS + ("final_loss", "train_wall_s", "eval_wall_s"):
    values = [r[key] for r in runs if r.get(key) is not None]
    if values:
      out[key] = spread(values)
  return out


def summarize(study, runs: dict[str, list[dict]], *, failures: list[dict], steps: int, eval_samples: int) -> dict:
  """results.json: the study, its settings, and per arm the seeds' results with their aggregate."""
  arms = {}
  for arm in study.arms:
    if arm.name not in runs:
      continue
    seeds = runs[arm.name]
    arms[arm.name] = {
      "label": arm.label,
      "seeds": [r["seed"] for r in seeds],
      "runs": [{k: v for k, v in r.items() if k != "recipe"} for r in seeds],
      "aggregate": aggregate(seeds) if seeds else None,
    }
  return {
    "study": study.name,
    "title": study.title,
    "paper": study.paper,
    "steps": steps,
    "eval_samples": eval_samples,
    "arms": arms,
    "failures": failures,
  }


def finished_arms(summary: dict) -> tuple[dict, list[str]]:
  """The arms a table or plot shows (those with a finished run) and the question types their runs hold."""
  arms = {name: a for name, a in summary["arms"].items() if a["aggregate"]}
  return arms, question_types([r for a in arms.values() for r in a["runs"]])


def markdown_table(study, summary: dict) -> str:
  """The study's table as docs/miniature.md shows it: per arm the mean ± std over seeds, in percent, of the
  overall and each type's accuracy (the fusion study adds samples/s and decoder tokens per sample)."""
  arms, types = finished_arms(summary)
  speed = speed_metrics(study)
  header = ["arm", "seeds", "overall"] + types + [m.replace("_", " ") for m in speed]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for arm in arms.values():
    agg = arm["aggregate"]
    accuracy = [agg["accuracy"]] + [agg["per_type"].get(t) for t in types]
    cells = [arm["label"].replace("<", "\\<"), str(len(arm["runs"]))]  # a tag in a label is text, not HTML
    cells += [f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "" for s in accuracy]
    cells += [f"{agg[m]['mean']:.1f} ± {agg[m]['std']:.1f}" for m in speed]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(study, summary: dict, path: Path) -> None:
  """Bars per question type (and overall) per arm: mean, std as error bars, each seed as a dot. The fusion
  study adds training samples/s and decoder tokens per sample."""
  arms, question_kinds = finished_arms(summary)
  types = ["overall"] + question_kinds
  speed = speed_metrics(study)
  panels = 1 + len(speed)
  fig, axes = plt.subplots(1, panels, figsize=(4 + 1.3 * len(types) + 3.5 * (panels - 1), 4.2), squeeze=False)
  ax = axes[0][0]
  width = 0.8 / max(len(arms), 1)
  for i, (name, arm) in enumerate(arms.items()):
    agg = arm["aggregate"]
    stats = [agg["accuracy"]] + [agg["per_type"].get(t) for t in types[1:]]
    x = np.arange(len(types)) + (i - (len(arms) - 1) / 2) * width
    means = [s["mean"] if s else np.nan for s in stats]
    stds = [s["std"] if s else 0.0 for s in stats]
    ax.bar(x, means, width, yerr=stds, capsize=2, label=arm["label"])
    for j, qtype in enumerate(types):
      points = [r["accuracy"] if qtype == "overall" else r["per_type"].get(qtype, np.nan) for r in arm["runs"]]
      ax.plot([x[j]] * len(points), points, "k.", markersize=3)
  ax.set_xticks(np.arange(len(types)), types, rotation=20)
  ax.set_ylim(0, 1)
  ax.set_ylabel("held-out accuracy (exact match)")
  seeds = max((len(a["runs"]) for a in arms.values()), default=0)
  ax.set_title(f"{study.title}\n{summary['steps']} steps, {seeds} seed(s): mean, std, seeds as dots", fontsize=9)
  ax.legend(fontsize=7)
  if speed:
    for ax, key, label in zip(axes[0][1:], speed, ("training samples/s", "decoder tokens per sample (mean)")):
      names = list(arms)
      means = [arms[n]["aggregate"][key]["mean"] for n in names]
      stds = [arms[n]["aggregate"][key]["std"] for n in names]
      ax.bar(names, means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(names))])
      ax.set_title(label, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
