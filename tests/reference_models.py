"""Tiny random `transformers` reference models, built offline, for parity tests.

Every test that compares against PyTorch builds its oracle here: a tiny config (GQA, rope_theta 1e6,
a few layers), random weights (norm scales and biases randomized too: HF initializes them to 1 and 0,
which would hide a mis-mapped norm or bias), `save_pretrained` with small shards so the
`model.safetensors.index.json` path is exercised, and an fp32 eager forward.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import transformers

TINY_TEXT = dict(
  vocab_size=384,
  hidden_size=64,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  intermediate_size=160,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  max_position_embeddings=2048,
)


def tiny_qwen2_config(**overrides) -> "transformers.Qwen2Config":
  return transformers.Qwen2Config(**{**TINY_TEXT, "bos_token_id": 1, "eos_token_id": 2, **overrides})


def tiny_llama_config(**overrides) -> "transformers.LlamaConfig":
  return transformers.LlamaConfig(**{**TINY_TEXT, **overrides})


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.08) -> torch.nn.Module:
  """Overwrites every parameter with seeded noise: weights N(0, std), norm scales 1 + N(0, 0.1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if "norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(std * noise)
  return model


def build_causal_lm(config, seed: int = 0) -> torch.nn.Module:
  """A random fp32 *ForCausalLM in eval mode with the eager (reference) attention."""
  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  randomize_(model, seed)
  return model.eval().to(torch.float32)


def save(
  model: torch.nn.Module, directory: str | Path, max_shard_size: str = "200KB", dtype: torch.dtype | None = None
) -> Path:
  """save_pretrained in small shards (index.json exercised); optionally a cast (e.g. bf16) copy."""
  directory = Path(directory)
  if dtype is not None:
    # a copy: Module.to() would also round the reference's non-persistent buffers (RoPE inv_freq) in place
    model = copy.deepcopy(model).to(dtype)
  model.save_pretrained(directory, max_shard_size=max_shard_size)
  return directory


def torch_logits(model: torch.nn.Module, input_ids: np.ndarray) -> np.ndarray:
  """fp32 logits [B, L, V] of the reference for int token ids [B, L]."""
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), use_cache=False)
  return out.logits.float().numpy()


def random_tokens(vocab_size: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab_size, size=shape, dtype=np.int32)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """The reference's tensors as fp32 numpy (bf16 values upcast exactly)."""
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
