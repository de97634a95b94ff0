"""Cost of the checkpoint checksums (nvlm_jax/checkpoint/integrity.py) next to the save they guard.

    python bench/checkpoint_integrity.py [--sizes-mb 0.5,1024] [--repeats 7]

For each size, a train-state-like tree of float32 arrays (half "params" in 16 MB-or-smaller leaves, half
Adam moments) is timed, interleaved, in three ways: `array_digests` (the on-device checksums a save
writes and a restore recomputes; compile timed on its own), an orbax `StandardSave` of the same tree to a
temporary directory (waited until written), and a `StandardRestore` of it. The ratio
digest / (save + restore) is the overhead a checkpoint round trip pays for its integrity check.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nvlm_jax.checkpoint import integrity


def state_tree(total_bytes: int, seed: int = 0) -> dict:
  """{"params": ..., "opt_state": ...} of float32 leaves of at most 16 MB, `total_bytes` in all."""
  leaf_elems = max(1, min(4 << 20, total_bytes // 4 // 16))
  n_leaves = max(2, total_bytes // 4 // leaf_elems)
  key = jax.random.key(seed)
  leaves = [jax.random.normal(jax.random.fold_in(key, i), (leaf_elems,), jnp.float32) for i in range(n_leaves)]
  half = n_leaves // 2
  return {
    "params": {f"w{i}": x for i, x in enumerate(leaves[:half])},
    "opt_state": {f"m{i}": x for i, x in enumerate(leaves[half:])},
  }


def measure(total_bytes: int, repeats: int) -> dict:
  tree = state_tree(total_bytes)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
  t0 = time.perf_counter()
  integrity._JITTED.clear()
  integrity.array_digests(tree, tree["params"])
  compile_s = time.perf_counter() - t0
  root = Path(tempfile.mkdtemp(prefix="nvlm_bench_integrity_"))
  checkpointer = ocp.StandardCheckpointer()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  counter = iter(range(10**6))
  saved: list[Path] = []

  def save():
    path = root / f"s{next(counter)}"
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    saved.append(path)

  def restore():
    jax.block_until_ready(checkpointer.restore(saved[-1], abstract))

  try:
    save()  # warm-up, and a checkpoint to restore
    times = common.interleaved_timings(
      {"digest": lambda: integrity.array_digests(tree, tree["params"]), "save": save, "restore": restore},
      repeats=repeats,
      warmup=0,
    )
  finally:
    checkpointer.close()
    shutil.rmtree(root, ignore_errors=True)
  med = {k: float(np.median(v)) for k, v in times.items()}
  return {
    "state_mb": round(nbytes / 2**20, 3),
    "leaves": len(jax.tree.leaves(tree)),
    "digest_compile_s": compile_s,
    "digest_s": med["digest"],
    "save_s": med["save"],
    "restore_s": med["restore"],
    "digest_gb_per_s": nbytes / 2**30 / med["digest"],
    "digest_over_save_plus_restore": med["digest"] / (med["save"] + med["restore"]),
  }


def main() -> None:
  parser = common.base_parser(__doc__)
  parser.add_argument("--sizes-mb", default="0.5,1024")
  args = parser.parse_args()
  result = {"machine": common.describe_machine(), "sizes": []}
  for mb in (float(s) for s in args.sizes_mb.split(",")):
    result["sizes"].append(measure(int(mb * 2**20), args.repeats))
  common.emit(common.rounded(result), args.out)


if __name__ == "__main__":
  main()
