"""Model hyper-parameters as frozen dataclasses.

Frozen dataclasses are hashable, so they can be attributes of flax modules and static arguments of
`jax.jit`. Experiment settings (optimizer, data, mesh) live in ml_collections files under configs/;
those files name or build one of these model configs.
"""

from __future__ import annotations

import dataclasses

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# Attention kernels a config may name (nvlm_jax/layers/attention_impl.py: what each supports, what auto picks).
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "splash")


def validate_attention_impl(name: str, where: str) -> None:
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"{where}.attention_impl={name!r}: choose one of {', '.join(ATTENTION_IMPLS)}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as Hugging Face configs name it (`rope_scaling` / `rope_parameters`);
  nvlm_jax.layers.rope implements each type as transformers does. Fields a type does not use stay at
  their defaults (the HF parser leaves them so, and the exporter writes only the used ones).

  default: plain RoPE. linear: factor. dynamic: factor (NTK base growth past max_position_embeddings;
  NVLM-D-72B's Qwen2 uses factor 3). llama3: factor, low_freq_factor, high_freq_factor,
  original_max_position_embeddings. yarn: factor, original_max_position_embeddings, beta_fast, beta_slow,
  attention_factor, mscale, mscale_all_dim, truncate.
  """

  rope_type: str = "default"
  factor: float | None = None
  original_max_position_embeddings: int | None = None  # None: the decoder's max_position_embeddings
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  beta_fast: float | None = None  # None: 32 (transformers' default)
  beta_slow: float | None = None  # None: 1
  attention_factor: float | None = None  # None: derived from factor (and mscale / mscale_all_dim)
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r}; implemented: {ROPE_TYPES}")
    needs = {
      "linear": ("factor",),
      "dynamic": ("factor",),
      "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    }.get(self.rope_type, ())
    missing = [name for name in needs if getattr(self, name) is None]
    if missing:
      raise ValueError(f"RoPE scaling {self.rope_type!r} needs {missing}")
    if self.rope_type == "llama3" and self.low_freq_factor >= self.high_freq_factor:
      raise ValueError(
        f"llama3 RoPE needs low_freq_factor < high_freq_factor, got {self.low_freq_factor} and {self.high_freq_factor}"
      )
    if self.rope_type != "default" and self.factor is not None and self.factor <= 0:
      raise ValueError(f"RoPE scaling factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A Qwen2- or Llama-family decoder (GQA, RoPE, RMSNorm, SwiGLU)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True  # Qwen2: True; Llama/Yi: False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # RoPE scaling (architecture; see RopeScaling). Plain RoPE unless a checkpoint's config asks otherwise.
  rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
  # Implementation switches (not architecture).
  scan_layers: bool = True
  remat_policy: str = "none"  # see nvlm_jax.layers.remat.POLICIES
  # Causal self-attention without a cache runs in query blocks of this many rows and skips the masked
  # upper triangle (exact; see layers.attention.dot_product_attention). 0 computes the full L x L.
  causal_block_size: int = 128
  # Attention kernel: auto | xla | blocked | cudnn | splash (nvlm_jax.layers.attention_impl; docs/training.md).
  attention_impl: str = "auto"
  dtype: str = "float32"  # activation / compute dtype
  param_dtype: str = "float32"

  @property
  def kv_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA)")
    validate_attention_impl(self.attention_impl, "llm")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim explicitly"
      )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """InternViT (docs/paper.md a.1): conv patch embedding, class token + learned positions, pre-norm blocks
  with layer scale, optional q/k normalization over the full hidden width, no final norm.

  `select_layer` picks the hidden state handed to the projector, indexed like HF `hidden_states`
  (0 = embeddings, k = output of layer k, -1 = last layer, -2 = second to last, ...).
  """

  image_size: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  num_channels: int = 3
  norm_type: str = "rms_norm"  # 'rms_norm' (InternViT-6B) | 'layer_norm' (InternViT-300M, HF default)
  layer_norm_eps: float = 1e-6  # block norms and the q/k norms (InternViT uses one eps for both)
  qk_normalization: bool = True
  qkv_bias: bool = False
  use_class_token: bool = True
  layer_scale_init: float = 0.1  # init of ls1/ls2 (InternViT `initializer_factor`); checkpoints override
  select_layer: int = -1
  # Implementation switches (not architecture).
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "auto"  # as DecoderConfig.attention_impl (the ViT's attention is full, unmasked)
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid_size(self) -> int:
    """Patches per side of one tile."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def num_positions(self) -> int:
    return self.num_patches + int(self.use_class_token)

  @property
  def depth(self) -> int:
    """How many encoder layers `select_layer` actually needs to run."""
    return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

  def replace(self, **changes) -> "VisionConfig":
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    validate_attention_impl(self.attention_impl, "vision")
    if self.norm_type not in ("rms_norm", "layer_norm"):
      raise ValueError(f"norm_type={self.norm_type!r}; expected 'rms_norm' or 'layer_norm'")
    if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
      raise ValueError(
        f"select_layer={self.select_layer} out of range for {self.num_layers} layers "
        f"(valid: {-(self.num_layers + 1)}..{self.num_layers})"
      )


def _shuffle_factor(downsample_ratio: float) -> int:
  """Tokens merged into one by pixel shuffle (0.5 -> 4), i.e. the projector's input width per ViT width."""
  return int(round(1 / downsample_ratio)) ** 2


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Vision -> LLM projector on pixel-shuffled features (in_features = vision hidden * 4).

  num_layers=2: LayerNorm -> Linear(in, hidden) -> GELU(exact) -> Linear(hidden, out).
    NVLM-D / NVLM-H `mlp1`: hidden = LLM intermediate size (12800 -> 29568 -> 8192), no biases.
    transformers InternVL `multi_modal_projector`: hidden = out = LLM hidden size, with biases.
  num_layers=1: LayerNorm -> Linear(in, out) (NVLM-X "one-layer MLP", paper 4.5; the paper does not say
    whether a LayerNorm precedes it: we keep it, as every other NVLM projector normalizes its input).
  """

  in_features: int
  hidden_size: int  # intermediate width (ignored when num_layers == 1)
  out_features: int
  num_layers: int = 2
  use_bias: bool = False
  layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default, as the HF ports (Megatron used 1e-6)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def replace(self, **changes) -> "ProjectorConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def mlp1(
    cls,
    vision: "VisionConfig",
    llm: "DecoderConfig",
    downsample_ratio: float = 0.5,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
  ) -> "ProjectorConfig":
    """NVLM-D / NVLM-H `mlp1`: LayerNorm -> Linear(4 Dv, LLM intermediate) -> GELU -> Linear(., LLM hidden), no bias.
    dtypes default to the LLM's."""
    return cls(
      in_features=vision.hidden_size * _shuffle_factor(downsample_ratio),
      hidden_size=llm.intermediate_size,
      out_features=llm.hidden_size,
      num_layers=2,
      use_bias=False,
      dtype=dtype or llm.dtype,
      param_dtype=param_dtype or llm.param_dtype,
    )

  @classmethod
  def one_layer(
    cls,
    vision: "VisionConfig",
    llm: "DecoderConfig",
    downsample_ratio: float = 0.5,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
  ) -> "ProjectorConfig":
    """NVLM-X: LayerNorm -> Linear(4 Dv, LLM hidden), no bias."""
    return dataclasses.replace(
      cls.mlp1(vision, llm, downsample_ratio, dtype=dtype, param_dtype=param_dtype),
      hidden_size=llm.hidden_size,
      num_layers=1,
    )

  @classmethod
  def internvl_hf(
    cls,
    vision: "VisionConfig",
    llm: "DecoderConfig",
    downsample_ratio: float = 0.5,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
  ) -> "ProjectorConfig":
    """transformers InternVL `multi_modal_projector`: as mlp1 but hidden = LLM hidden size, with biases."""
    return dataclasses.replace(
      cls.mlp1(vision, llm, downsample_ratio, dtype=dtype, param_dtype=param_dtype),
      hidden_size=llm.hidden_size,
      use_bias=True,
    )

  @classmethod
  def for_variant(
    cls, variant: str, vision: "VisionConfig", llm: "DecoderConfig", downsample_ratio: float = 0.5, **dtypes
  ) -> "ProjectorConfig":
    """The projector each NVLM variant starts from: X one layer, D and H mlp1."""
    return (cls.one_layer if variant == "x" else cls.mlp1)(vision, llm, downsample_ratio, **dtypes)

  def __post_init__(self):
    if self.num_layers not in (1, 2):
      raise ValueError(f"projector num_layers={self.num_layers}; expected 1 (NVLM-X) or 2 (mlp2)")


NVLM_VARIANTS = ("d", "x", "h")


@dataclasses.dataclass(frozen=True)
class CrossAttentionConfig:
  """The gated cross-attention blocks of NVLM-X / NVLM-H (docs/fusion.md explains every choice).

  Block g (g = 0 .. num_layers/every - 1) runs just before LLM self-attention layer `g * every + offset`
  (offset = every: after the group's last layer). The paper fixes only `every` (8 for the 80-layer
  72B, 6 for the 60-layer 34B: 10 blocks each); offset defaults to every - 1, the placement of
  OpenFlamingo and Llama 3.2 Vision (each block is followed by one self-attention layer of its group).

  Heads / widths left None take the LLM's (GQA like the LLM). `max_tag_tokens` bounds the tile-tag
  tokens put in front of each tile's image tokens in the key/value stream (static shapes).
  `skip_tokens_without_image`: a token that sees no image gets neither the attention nor the
  feed-forward update (the block is exactly the identity for it, as in Llama 3.2 Vision), so text-only
  inputs compute exactly the LLM whatever the gates are.
  Unused by variant 'd'.
  """

  every: int = 0  # LLM layers per block; 0 = not configured (an error for variants x/h)
  offset: int | None = None  # None: every - 1
  num_heads: int | None = None
  num_kv_heads: int | None = None
  head_dim: int | None = None
  intermediate_size: int | None = None
  qk_norm: bool = True  # RMSNorm over head_dim on queries and keys
  memory_norm: bool = True  # RMSNorm on the key/value stream (tag embeddings + image features) per block
  skip_tokens_without_image: bool = True
  max_tag_tokens: int = 8
  init_std: float = 0.02  # normal init of the new projections (Qwen2's initializer_range)
  gate_init: float = 0.0  # tanh(0) = 0: an untrained X/H model computes exactly its LLM

  @property
  def resolved_offset(self) -> int:
    return self.every - 1 if self.offset is None else self.offset

  def num_blocks(self, num_layers: int) -> int:
    return num_layers // self.every if self.every else 0

  def positions(self, num_layers: int) -> tuple[int, ...]:
    """LLM layer indices before which the blocks run (num_layers = after the last layer)."""
    return tuple(g * self.every + self.resolved_offset for g in range(self.num_blocks(num_layers)))

  def group_parts(self) -> dict[str, tuple[int, int]]:
    """The one regrouping rule of the LLM's layers around the blocks (KV cache, params, streamed stitch): in a
    group of `every` layers, layers [lo, hi) form the scanned stack named here (empty stacks omitted)."""
    parts = {"layers_before": (0, self.resolved_offset), "layers_after": (self.resolved_offset, self.every)}
    return {name: (lo, hi) for name, (lo, hi) in parts.items() if hi > lo}

  def layer_slot(self, layer: int) -> tuple[str, int, int]:
    """LLM layer i -> (stack name, group g, index in that stack): i = g * every + j (see group_parts)."""
    g, j = divmod(int(layer), self.every)
    name, (lo, _) = next((n, r) for n, r in self.group_parts().items() if r[0] <= j < r[1])
    return name, g, j - lo

  def heads(self, llm: "DecoderConfig") -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim), defaulting to the LLM's."""
    return (self.num_heads or llm.num_heads, self.num_kv_heads or llm.num_kv_heads, self.head_dim or llm.kv_head_dim)

  def ffn_size(self, llm: "DecoderConfig") -> int:
    return self.intermediate_size or llm.intermediate_size

  def replace(self, **changes) -> "CrossAttentionConfig":
    return dataclasses.replace(self, **changes)

  def validate(self, llm: "DecoderConfig", where: str = "cross_attention") -> None:
    if self.every <= 0:
      raise ValueError(
        f"{where}.every={self.every}: set how many LLM layers each gated cross-attention block "
        "spans (paper: 8 for the 80-layer 72B, 6 for the 60-layer 34B)"
      )
    if llm.num_layers % self.every:
      raise ValueError(f"{where}.every={self.every} does not divide llm.num_layers={llm.num_layers}")
    if not 0 <= self.resolved_offset <= self.every:
      raise ValueError(f"{where}.offset={self.offset} must lie in 0..every={self.every}")
    heads, kv_heads, _ = self.heads(llm)
    if heads % kv_heads:
      raise ValueError(f"{where}: num_heads={heads} is not a multiple of num_kv_heads={kv_heads} (GQA)")
    if self.max_tag_tokens < 0:
      raise ValueError(f"{where}.max_tag_tokens={self.max_tag_tokens} must be >= 0")


@dataclasses.dataclass(frozen=True)
class NVLMConfig:
  """A whole NVLM model: shared vision pathway (ViT -> pixel shuffle -> projector) + decoder.

  variant 'd': image tokens replace placeholder ids in the decoder stream (NVLM-D).
  variant 'x': tile tags stay in the decoder as text, each followed by ONE placeholder (the tile's
    anchor); the tiles (tag embeddings + image tokens) are read by gated cross-attention blocks.
  variant 'h': like 'x' for the regular tiles, like 'd' for the global view (the thumbnail's
    `tokens_per_tile` placeholders receive its image tokens).
  See docs/fusion.md. `image_start_token_ids` are the ids of `<Image>` tokenized on its own (what the
  X/H processor writes); X/H use them to find where the first tile tag of an image begins.
  """

  variant: str
  vision: VisionConfig
  projector: ProjectorConfig
  llm: DecoderConfig
  image_token_id: int  # placeholder id repeated tokens_per_tile times per tile (may lie outside the vocab)
  downsample_ratio: float = 0.5  # pixel shuffle: 1/ratio^2 neighbouring tokens concatenated per token
  ps_version: str = "v2"  # pixel shuffle token order; 'v1' (transposed) is not what NVLM was trained with
  max_tiles: int = 6  # regular DHR tiles per image (docs/paper.md (b))
  use_thumbnail: bool = True  # + a global thumbnail when an image has more than one tile
  freeze_vision: bool = True  # stop_gradient on the ViT output (frozen in every NVLM stage)
  debug_checks: bool = False  # also check placeholder counts under jit (host callback; off by default)
  cross_attention: CrossAttentionConfig = dataclasses.field(default_factory=CrossAttentionConfig)  # x / h only
  image_start_token_ids: tuple[int, ...] = ()  # x / h only: `<Image>` as the processor tokenizes it

  @property
  def tokens_per_tile(self) -> int:
    side = self.vision.grid_size * self.downsample_ratio
    return int(round(side)) ** 2

  @property
  def max_tiles_per_image(self) -> int:
    return self.max_tiles + int(self.use_thumbnail and self.max_tiles > 1)

  def replace(self, **changes) -> "NVLMConfig":
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    if self.variant not in NVLM_VARIANTS:
      raise ValueError(f"variant={self.variant!r}; expected one of {NVLM_VARIANTS}")
    if self.ps_version not in ("v1", "v2"):
      raise ValueError(f"ps_version={self.ps_version!r}; expected 'v1' or 'v2'")
    factor = 1.0 / self.downsample_ratio
    if abs(factor - round(factor)) > 1e-9 or round(factor) < 1:
      raise ValueError(f"downsample_ratio={self.downsample_ratio} must be 1/k for an integer k")
    factor = int(round(factor))
    if self.vision.grid_size % factor:
      raise ValueError(
        f"vision grid {self.vision.grid_size}x{self.vision.grid_size} is not divisible by the "
        f"pixel-shuffle factor {factor} (downsample_ratio={self.downsample_ratio})"
      )
    expected_in = self.vision.hidden_size * factor * factor
    if self.projector.in_features != expected_in:
      raise ValueError(
        f"projector.in_features={self.projector.in_features}, expected vision hidden "
        f"{self.vision.hidden_size} x {factor * factor} = {expected_in}"
      )
    if self.projector.out_features != self.llm.hidden_size:
      raise ValueError(
        f"projector.out_features={self.projector.out_features} != llm.hidden_size={self.llm.hidden_size}"
      )
    if self.variant in ("x", "h"):
      self.cross_attention.validate(self.llm)
      if self.variant == "h" and self.tokens_per_tile < 2:
        raise ValueError(
          f"NVLM-H needs tokens_per_tile >= 2 (got {self.tokens_per_tile}): a run of one "
          "placeholder marks a cross-attention tile, a run of tokens_per_tile the thumbnail"
        )
