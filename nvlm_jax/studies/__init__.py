"""The paper's ablations in miniature: each study trains its arms on the synthetic set and compares their
held-out accuracy (docs/miniature.md).

    python -m nvlm_jax.studies --list
    python -m nvlm_jax.studies tile_tags --out studies/ [--seeds 3] [--steps N] [--eval-samples N]

definitions.py: the studies and the recipe of every arm; runner.py: training, evaluation, resume;
report.py: results.json and the plot.
"""
