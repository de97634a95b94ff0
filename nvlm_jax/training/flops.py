"""Analytic model FLOPs of one train step, and MFU.

Convention (MaxText / PaLM style "model FLOPs"): count the matmuls and attention the model needs, not
what the implementation happens to run; recomputation under remat is NOT counted, and the 2 x L^2 of
causal attention is halved (only the lower triangle is needed). One multiply-add = 2 FLOPs.

Per tower (vision encoder -> projector -> LLM), with N = weight-matmul parameters of the tower and
`tokens` = the tokens it processes in the step:

  forward                    F = 2 * N * tokens + attention
  backward, input grads      F        if gradients must flow through the tower (it, or a tower before it,
                                      is trainable)
  backward, weight grads     2 * N * tokens   if the tower itself is trainable
  => trainable tower: 6 N tokens (+ 3x attention); frozen tower after a trainable one (NVLM-D
     pretraining: the LLM behind the trainable projector): 4 N tokens (+ 3x attention); frozen tower with
     nothing trainable before it (the ViT): 2 N tokens (+ 1x attention), forward only.

Attention forward per layer: QK^T and PV, each 2 * Lq * Lk * width, i.e. 4 * Lq * Lk * width, with
Lq*Lk = L^2 / 2 for causal self-attention and L^2 for the bidirectional ViT. width = heads * head_dim.
Token counts: LLM = B * L (the padded row length: packing fills rows), ViT = B * T * (patches + cls),
projector = B * T * tokens_per_tile, where T is the tiles the step encodes (the tile budget if one is set).
Embedding lookups cost nothing; the LM head counts as a matmul.

NVLM-X/H add a `cross_attention` tower: G = num_layers / every gated blocks, each with q/o projections and
a SwiGLU on the B * L decoder tokens, k/v projections on the B * S key/value tokens (S = T * (max_tag_tokens
+ tokens_per_tile), every tile slot), and attention 4 * L * S * width per block (not causal: masked, not
skipped). For the gradient rule it sits between the projector and the LLM: a trainable cross-attention
block inside a frozen LLM (NVLM-X pretraining) makes the LLM layers pay input gradients (4 N).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from nvlm_jax.config import DecoderConfig, NVLMConfig, ProjectorConfig, VisionConfig
from nvlm_jax.training.optimizer import TRAINABLE, path_str


@dataclasses.dataclass(frozen=True)
class TowerFlops:
  """Forward FLOPs of one tower: matmuls with weights and (weight-free) attention."""

  name: str
  matmul: float
  attention: float


def decoder_matmul_params(cfg: DecoderConfig) -> int:
  d, hd = cfg.hidden_size, cfg.kv_head_dim
  per_layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
  return cfg.num_layers * per_layer + d * cfg.vocab_size  # + LM head (tied or not, it is a matmul)


def decoder_forward(cfg: DecoderConfig, batch: int, seq_len: int) -> TowerFlops:
  tokens = batch * seq_len
  width = cfg.num_heads * cfg.kv_head_dim
  attention = cfg.num_layers * 4 * batch * (seq_len * seq_len / 2) * width
  return TowerFlops("language_model", 2.0 * decoder_matmul_params(cfg) * tokens, attention)


def vision_matmul_params(cfg: VisionConfig, layers: int | None = None) -> int:
  d = cfg.hidden_size
  layers = cfg.depth if layers is None else layers
  per_layer = 4 * d * d + 2 * d * cfg.intermediate_size
  return layers * per_layer


def vision_forward(cfg: VisionConfig, num_tiles: int) -> TowerFlops:
  seq = cfg.num_positions
  patch_embed = 2.0 * num_tiles * cfg.num_patches * (cfg.patch_size**2 * cfg.num_channels) * cfg.hidden_size
  matmul = 2.0 * vision_matmul_params(cfg) * num_tiles * seq + patch_embed
  attention = cfg.depth * 4 * num_tiles * seq * seq * cfg.hidden_size
  return TowerFlops("vision_model", matmul, attention)


def projector_matmul_params(cfg: ProjectorConfig) -> int:
  if cfg.num_layers == 1:
    return cfg.in_features * cfg.out_features
  return cfg.in_features * cfg.hidden_size + cfg.hidden_size * cfg.out_features


def projector_forward(cfg: ProjectorConfig, num_tokens: int) -> TowerFlops:
  return TowerFlops("projector", 2.0 * projector_matmul_params(cfg) * num_tokens, 0.0)


def cross_attention_forward(cfg: NVLMConfig, batch: int, seq_len: int, tile_slots: int) -> TowerFlops:
  """The gated cross-attention blocks of NVLM-X/H; tile_slots: T per row (the key/value stream's tiles)."""
  llm, xc = cfg.llm, cfg.cross_attention
  heads, kv_heads, head_dim = xc.heads(llm)
  d, blocks = llm.hidden_size, xc.num_blocks(llm.num_layers)
  per_text_token = d * heads * head_dim * 2 + 3 * d * xc.ffn_size(llm)  # q, o, SwiGLU
  per_memory_token = 2 * d * kv_heads * head_dim  # k, v
  memory = tile_slots * (xc.max_tag_tokens + cfg.tokens_per_tile)
  matmul = 2.0 * blocks * (per_text_token * batch * seq_len + per_memory_token * batch * memory)
  attention = blocks * 4 * batch * seq_len * memory * heads * head_dim
  return TowerFlops("cross_attention", matmul, attention)


def forward_towers(
  model_config, *, batch_size: int, seq_len: int, num_tiles: int = 0, tile_slots: int = 0
) -> list[TowerFlops]:
  """The towers in data-flow order. num_tiles: tiles encoded per step (B * T, or the tile budget);
  tile_slots: T, the tile slots per row (cross-attention key/value stream of NVLM-X/H)."""
  if isinstance(model_config, DecoderConfig):
    return [decoder_forward(model_config, batch_size, seq_len)]
  if isinstance(model_config, NVLMConfig):
    towers = [
      vision_forward(model_config.vision, num_tiles),
      projector_forward(model_config.projector, num_tiles * model_config.tokens_per_tile),
    ]
    if model_config.variant in ("x", "h"):
      slots = tile_slots or max(num_tiles // max(batch_size, 1), 1)
      towers.append(cross_attention_forward(model_config, batch_size, seq_len, slots))
    return towers + [decoder_forward(model_config.llm, batch_size, seq_len)]
  raise TypeError(f"no FLOPs model for {type(model_config).__name__}")


def train_step_flops(
  model_config,
  *,
  batch_size: int,
  seq_len: int,
  num_tiles: int = 0,
  tile_slots: int = 0,
  trainable_towers: Iterable[str],
) -> dict[str, float]:
  """Model FLOPs of one train step (forward + backward) per tower and in total (key 'total').

  trainable_towers: towers with trainable parameters ('vision_model', 'projector', 'cross_attention',
  'language_model'; a text-only CausalLM is the single tower 'language_model').
  """
  trainable = set(trainable_towers)
  out, grads_flow = {}, False
  for tower in forward_towers(
    model_config, batch_size=batch_size, seq_len=seq_len, num_tiles=num_tiles, tile_slots=tile_slots
  ):
    is_trainable = tower.name in trainable
    grads_flow = grads_flow or is_trainable
    matmul = tower.matmul * (1 + (1 if grads_flow else 0) + (1 if is_trainable else 0))
    attention = tower.attention * (3 if grads_flow else 1)
    out[tower.name] = matmul + attention
  out["total"] = sum(out.values())
  return out


def tower_of(path: str, model_config) -> str:
  """The FLOPs tower of a '/'-joined parameter path."""
  if isinstance(model_config, DecoderConfig):
    return "language_model"
  top = path.split("/")[0]
  if top == "language_model" and "cross_attn" in path:
    return "cross_attention"
  return top


def trainable_towers_from_labels(labels, model_config) -> set[str]:
  """Towers that hold at least one trainable parameter."""
  import jax

  return {
    tower_of(path_str(p), model_config)
    for p, label in jax.tree_util.tree_leaves_with_path(labels)
    if label == TRAINABLE
  }


def mfu(flops_per_step: float, step_seconds: float, mesh_devices: int, peak_flops_per_device: float) -> float:
  """Model FLOPs utilization in [0, 1]: achieved FLOP/s over the peak of the devices that ran the step.

  `mesh_devices` is the size of the step's mesh, not `jax.device_count()`: a mesh may use fewer devices than
  exist, and the idle ones must not dilute the figure."""
  if step_seconds <= 0 or peak_flops_per_device <= 0:
    return 0.0
  return flops_per_step / step_seconds / (mesh_devices * peak_flops_per_device)
