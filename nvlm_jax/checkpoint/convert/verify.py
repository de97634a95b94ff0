"""`convert verify`: does our checkpoint compute what the Hugging Face files compute?

    python -m nvlm_jax.convert verify --hf-dir /ckpt/Qwen2-7B --checkpoint /ckpt/qwen2_7b_jax

Three models on the same random inputs (text, plus image tiles and their placeholders for NVLM):
  1. our orbax checkpoint, restored with `load_checkpoint`;
  2. the HF directory loaded by our importer (`load_pretrained`);
  3. transformers' own model of the HF directory, when transformers is installed and knows the
     architecture (Qwen2, Llama, InternVL; NVLM-D needs the release's remote code and is skipped).
It reports the largest parameter difference between 1 and 2 and the largest logit difference of 1
against 2 and 3, all in float32, and compares dtypes: a source tensor that is not floating-point is an
error (as in `import`), and a parameter the checkpoint stores in another dtype than the files' (or not
as a float) is listed; a non-float stored parameter fails the check. Everything is loaded whole: meant
for models that fit in host memory (twice, plus transformers' copy).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nvlm_jax.checkpoint.convert.importer import check_float_tensors, is_float_dtype
from nvlm_jax.checkpoint.convert.output import ConvertError
from nvlm_jax.checkpoint.convert.sources import HFSource, OrbaxSource, majority_dtype
from nvlm_jax.checkpoint.vision_layouts import layout_rules
from nvlm_jax.config import DecoderConfig, NVLMConfig
from nvlm_jax.models import load_checkpoint, load_pretrained

TRANSFORMERS_ARCHS = {
  "Qwen2ForCausalLM": "AutoModelForCausalLM",
  "LlamaForCausalLM": "AutoModelForCausalLM",
  "InternVLForConditionalGeneration": "AutoModelForImageTextToText",
}


def make_inputs(cfg, seq_len: int, tiles: int, seed: int) -> dict[str, np.ndarray]:
  """Random token ids [1, L] (+ for NVLM: `tiles` random tiles and their placeholder runs)."""
  rng = np.random.default_rng(seed)
  llm = cfg.llm if isinstance(cfg, NVLMConfig) else cfg
  if not isinstance(llm, DecoderConfig):
    raise ConvertError(f"verify: no forward for a {type(cfg).__name__} checkpoint (language or NVLM models only)")
  if not isinstance(cfg, NVLMConfig) or tiles == 0:
    return {"input_ids": rng.integers(0, llm.vocab_size, size=(1, seq_len)).astype(np.int32)}
  per_tile = cfg.tokens_per_tile
  seq_len = max(seq_len, tiles * (per_tile + 2) + 8)
  ids = rng.integers(0, llm.vocab_size, size=(seq_len,))
  ids[ids == cfg.image_token_id] = 0
  pos = 4
  for _ in range(tiles):
    pos += 2  # two text tokens (a tile tag) before each tile's run
    ids[pos : pos + per_tile] = cfg.image_token_id
    pos += per_tile
  v = cfg.vision
  pixels = rng.standard_normal((1, tiles, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
  return {"input_ids": ids[None].astype(np.int32), "pixel_values": pixels, "tile_mask": np.ones((1, tiles), bool)}


def _forward_fn(model):
  return jax.jit(lambda p, ids, kw: model.apply({"params": p}, ids, **kw))


def _forward(fn, params, inputs: dict) -> np.ndarray:
  extra = {k: jnp.asarray(v) for k, v in inputs.items() if k != "input_ids"}
  with jax.default_matmul_precision("highest"):
    out = fn(params, jnp.asarray(inputs["input_ids"]), extra)
  return np.asarray(out, np.float32)


def _transformers_logits(hf_dir: Path, arch: str, inputs: dict) -> np.ndarray:
  import torch
  import transformers

  auto = getattr(transformers, TRANSFORMERS_ARCHS[arch])
  model = auto.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
  kwargs = {"input_ids": torch.as_tensor(inputs["input_ids"], dtype=torch.long), "use_cache": False}
  if "pixel_values" in inputs:
    pixels = inputs["pixel_values"][0]  # [T, H, W, C] -> [T, C, H, W]
    kwargs["pixel_values"] = torch.as_tensor(pixels).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _stored_dtypes(checkpoint) -> dict[str, str]:
  """param path -> the dtype our checkpoint stores it in (read from its array metadata, nothing loaded)."""

  return {path: np.dtype(info.dtype).name for path, info in OrbaxSource(checkpoint).reader.arrays.items()}


def verify(
  hf_dir: str | os.PathLike,
  checkpoint: str | os.PathLike,
  *,
  seq_len: int = 64,
  tiles: int = 2,
  seed: int = 0,
  atol: float = 1e-3,
  layout: str = "auto",
  use_transformers: bool = True,
) -> dict[str, Any]:
  """Compares the three models; `ok` is False when a difference exceeds `atol`."""

  hf_dir = Path(hf_dir)
  ours, our_params = load_checkpoint(checkpoint, dtype="float32", param_dtype="float32")
  cfg = ours.config
  scan = (cfg.llm if isinstance(cfg, NVLMConfig) else cfg).scan_layers
  source = HFSource(hf_dir, layout=layout, dtype="float32", scan_layers=scan)
  check_float_tensors(source)
  imported, imported_params = load_pretrained(
    hf_dir,
    dtype=jnp.float32,
    scan_layers=scan,
    layout=source.layout.name,
    rules=lambda c: layout_rules(source.layout, c, source.ckpt),
  )
  report: dict[str, Any] = {"hf_dir": str(hf_dir), "checkpoint": str(checkpoint), "layout": source.layout.name}

  a = traverse_util.flatten_dict(our_params, sep="/")
  b = traverse_util.flatten_dict(imported_params, sep="/")
  if set(a) != set(b):
    only = sorted(set(a) ^ set(b))
    raise ConvertError(
      f"verify: the two models have different parameters, e.g. {only[:5]} (was the checkpoint converted from {hf_dir}?)"
    )
  diffs = {p: _max_diff(a[p], b[p]) for p in a if tuple(a[p].shape) == tuple(b[p].shape)}
  shape_mismatch = [p for p in a if tuple(a[p].shape) != tuple(b[p].shape)]
  if shape_mismatch:
    raise ConvertError(f"verify: parameter shapes differ: {shape_mismatch[:5]}")
  stored = _stored_dtypes(checkpoint)
  source_dtype = majority_dtype(source.ckpt)
  report["param_dtypes"] = {d: sum(1 for v in stored.values() if v == d) for d in sorted(set(stored.values()))}
  differ = sorted(f"{p}: stored {d}, files {source_dtype}" for p, d in stored.items() if d != source_dtype)
  report["dtype_mismatches"] = {"count": len(differ), "examples": differ[:5]}
  non_float = [p for p, d in stored.items() if not is_float_dtype(d)]
  worst = max(diffs, key=diffs.get)
  report["param_max_abs_diff"] = diffs[worst]
  report["param_max_abs_diff_at"] = worst

  inputs = make_inputs(cfg, seq_len, tiles, seed)
  report["inputs"] = {k: list(v.shape) for k, v in inputs.items()}
  forward = _forward_fn(ours)
  logits = _forward(forward, our_params, inputs)
  report["logits_max_abs"] = float(np.max(np.abs(logits)))
  # One compiled program serves both when the configs agree (they do for a faithful conversion).
  other = forward if imported.config == ours.config else _forward_fn(imported)
  report["vs_importer_max_abs_diff"] = _max_diff(logits, _forward(other, imported_params, inputs))
  del imported_params, b

  arch = (source.cfg_json.get("architectures") or [None])[0]
  if not use_transformers:
    report["vs_transformers"] = "skipped (--no-transformers)"
  elif arch not in TRANSFORMERS_ARCHS:
    report["vs_transformers"] = f"skipped (transformers has no built-in {arch})"
  else:
    try:
      import transformers  # noqa: F401
    except ImportError:
      report["vs_transformers"] = "skipped (transformers is not installed)"
    else:
      report["vs_transformers_max_abs_diff"] = _max_diff(logits, _transformers_logits(hf_dir, arch, inputs))
  checks = [report["vs_importer_max_abs_diff"], report.get("vs_transformers_max_abs_diff", 0.0)]
  report["atol"] = atol
  report["ok"] = bool(all(d <= atol for d in checks)) and not non_float
  return report
