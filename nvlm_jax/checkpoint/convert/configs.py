"""Our model configs -> the `config.json` each Hugging Face layout expects (the export direction of
text_layouts.decoder_config_from_hf and the vision_layouts config parsers).

Written for the readers that matter: transformers 5 (`rope_parameters`, `dtype`) and older readers and
vLLM (`rope_theta`, `torch_dtype`) alike, so both spellings are written. `export` re-parses every file
it writes with our own importer and refuses a config that does not come back identical, so a field
these writers forget cannot silently change the model.
"""

from __future__ import annotations

from typing import Any

from nvlm_jax.checkpoint.text_layouts import ROPE_TYPE_FIELDS
from nvlm_jax.config import DecoderConfig, NVLMConfig, VisionConfig


def _dtype_fields(dtype: str) -> dict:
  return {"dtype": dtype, "torch_dtype": dtype}


def rope_config_json(cfg: DecoderConfig) -> dict[str, Any]:
  """`rope_theta`, `rope_parameters` (transformers 5) and, for scaled RoPE, `rope_scaling` (older readers and
  vLLM), each holding the type's fields (the inverse of text_layouts.rope_from_hf)."""
  scaling = cfg.rope_scaling
  fields = {
    name: getattr(scaling, name) for name in ROPE_TYPE_FIELDS[scaling.rope_type] if getattr(scaling, name) is not None
  }
  out: dict[str, Any] = {
    "rope_theta": cfg.rope_theta,
    "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": scaling.rope_type, **fields},
  }
  if scaling.rope_type != "default":
    out["rope_scaling"] = {"rope_type": scaling.rope_type, "type": scaling.rope_type, **fields}
  return out


def decoder_config_json(cfg: DecoderConfig, model_type: str, dtype: str) -> dict[str, Any]:
  """Qwen2Config / LlamaConfig dict for a DecoderConfig (model_type 'qwen2' or 'llama')."""
  arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
  out: dict[str, Any] = {
    "architectures": [arch],
    "model_type": model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_position_embeddings,
    "rms_norm_eps": cfg.rms_norm_eps,
    **rope_config_json(cfg),
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    "pad_token_id": cfg.pad_token_id,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    **_dtype_fields(dtype),
  }
  if cfg.head_dim is not None:  # absent: hidden_size // num_attention_heads, as in transformers
    out["head_dim"] = cfg.head_dim
  if model_type == "qwen2":
    out.update(
      use_sliding_window=False,
      sliding_window=None,
      max_window_layers=cfg.num_layers,
      layer_types=["full_attention"] * cfg.num_layers,
    )
  else:
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  return out


def _llm_model_type(cfg: DecoderConfig) -> str:
  return "qwen2" if cfg.qkv_bias else "llama"


def internvl_vision_config_json(cfg: VisionConfig) -> dict[str, Any]:
  """transformers InternVLVisionConfig dict."""
  return {
    "model_type": "internvl_vision",
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "intermediate_size": cfg.intermediate_size,
    "hidden_act": "gelu",
    "image_size": [cfg.image_size, cfg.image_size],
    "patch_size": [cfg.patch_size, cfg.patch_size],
    "num_channels": cfg.num_channels,
    "norm_type": cfg.norm_type,
    "layer_norm_eps": cfg.layer_norm_eps,
    "use_qk_norm": cfg.qk_normalization,
    "attention_bias": cfg.qkv_bias,
    "layer_scale_init_value": cfg.layer_scale_init,
    "use_mean_pooling": True,  # True = no final LayerNorm, as InternViT
    "use_absolute_position_embeddings": True,
    "use_mask_token": False,
    "attention_dropout": 0.0,
    "hidden_dropout_prob": 0.0,
    "projection_dropout": 0.0,
    "initializer_range": 0.02,
  }


def internvl_config_json(cfg: NVLMConfig, dtype: str) -> dict[str, Any]:
  """transformers InternVLConfig dict (InternVLForConditionalGeneration, hub key names)."""
  text = decoder_config_json(cfg.llm, _llm_model_type(cfg.llm), dtype)
  text.pop("architectures")
  return {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "vision_config": internvl_vision_config_json(cfg.vision),
    "text_config": text,
    "image_token_id": cfg.image_token_id,
    "image_seq_length": cfg.tokens_per_tile,
    "downsample_ratio": cfg.downsample_ratio,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": cfg.vision.select_layer,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": cfg.llm.tie_word_embeddings,
    **_dtype_fields(dtype),
  }


def intern_vit_config_json(cfg: VisionConfig, dtype: str, num_dummy_heads: int = 0) -> dict[str, Any]:
  """InternVL / NVLM `InternVisionConfig` dict (model_type intern_vit_6b)."""
  out = {
    "architectures": ["InternVisionModel"],
    "model_type": "intern_vit_6b",
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "intermediate_size": cfg.intermediate_size,
    "hidden_act": "gelu",
    "image_size": cfg.image_size,
    "patch_size": cfg.patch_size,
    "num_channels": cfg.num_channels,
    "norm_type": cfg.norm_type,
    "layer_norm_eps": cfg.layer_norm_eps,
    "qk_normalization": cfg.qk_normalization,
    "qkv_bias": cfg.qkv_bias,
    "initializer_factor": cfg.layer_scale_init,
    "initializer_range": 0.02,
    "drop_path_rate": 0.0,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "use_flash_attn": False,
    **_dtype_fields(dtype),
  }
  if num_dummy_heads:
    out["num_dummy_heads"] = num_dummy_heads  # the zero heads stored after the real ones (docs/paper.md a.2)
  return out


def nvlm_d_config_json(cfg: NVLMConfig, dtype: str, num_dummy_heads: int = 0) -> dict[str, Any]:
  """nvidia/NVLM-D-72B style config.json (NVLM_D_Config: vision_config, llm_config, tiling fields).

  The released repo's remote-code files (configuration_nvlm_d.py, modeling_*.py) are not ours to ship;
  `auto_map` names them as the release does, so copying them next to the weights makes
  `trust_remote_code=True` loading work. vLLM reads the NVLM_D architecture natively.
  """
  llm = decoder_config_json(cfg.llm, "qwen2", dtype)
  return {
    "architectures": ["NVLM_D"],
    "model_type": "NVLM_D",
    "auto_map": {
      "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
      "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
      "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
    },
    "vision_config": intern_vit_config_json(cfg.vision, dtype, num_dummy_heads),
    "llm_config": llm,
    "downsample_ratio": cfg.downsample_ratio,
    "ps_version": cfg.ps_version,
    "select_layer": cfg.vision.select_layer,
    "force_image_size": cfg.vision.image_size,
    "dynamic_image_size": True,
    "use_thumbnail": cfg.use_thumbnail,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": cfg.max_tiles,
    "image_token_id": cfg.image_token_id,
    **_dtype_fields(dtype),
  }
