"""Batched, KV-cached generation for every model in the package.

One jit-compiled program per (batch, prompt length, max_new_tokens, sampling settings): a prefill
over the whole prompt (images included) fills the cache, then a `lax.while_loop` decodes one token
per step until every row has produced EOS or the budget is spent. No Python runs per token.

Prompts of different lengths are re-aligned to the right (left padding) on the host, so every row
writes its next token into the same cache slot; positions count real tokens only, so padding never
shifts RoPE. Models follow one protocol: `apply(vars, input_ids, segment_ids=..., cache=..., **images)`
returns (logits, cache), and `model.init_cache(batch, length)` makes an empty cache.

`stream_generate` is the same computation for callers that need each token on the host as soon as it
exists (chat): the prefill and one decode step are each compiled once, and a Python loop drives them.

The prefill runs the model as given. The decode steps run `layer_views.decoding_layout(model, params)`: for a
scanned model on CPU, the unrolled module over per-layer views of the same weight buffers, so that no step
copies a layer's weights out of the stacks (and no weight memory is added).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nvlm_jax.layer_views import decoding_layout


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy; top_k / top_p filter the distribution before sampling."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def language_config(model) -> Any:
  """The DecoderConfig of a text-only model or of a fusion model's language model."""
  config = model.config
  return getattr(config, "llm", config)


def sample_token(logits: jnp.ndarray, rng: jax.Array, sampling: SamplingConfig) -> jnp.ndarray:
  """Picks one token per row from logits [B, V]."""
  logits = logits.astype(jnp.float32)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k is not None:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep a token if the mass before it is below top_p (so the top token is always kept).
    keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_align(
  input_ids: np.ndarray, attention_mask: np.ndarray, pad_id: int, pad_to_multiple_of: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Moves each row's real tokens to the right end (left padding). Returns (ids, segment_ids).

  The width is the longest row, rounded up to a multiple of `pad_to_multiple_of` if given (fewer
  distinct prompt shapes, so fewer compilations when many batches are generated).
  """
  input_ids = np.asarray(input_ids)
  attention_mask = np.asarray(attention_mask).astype(bool)
  if input_ids.shape != attention_mask.shape:
    raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} differ in shape")
  lengths = attention_mask.sum(axis=1)
  if (lengths == 0).any():
    raise ValueError(f"rows {np.flatnonzero(lengths == 0).tolist()} have an empty prompt")
  width = int(lengths.max())
  if pad_to_multiple_of:
    width = -(-width // int(pad_to_multiple_of)) * int(pad_to_multiple_of)
  ids = np.full((input_ids.shape[0], width), pad_id, dtype=np.int32)
  segments = np.zeros((input_ids.shape[0], width), dtype=np.int32)
  for row, (tokens, keep) in enumerate(zip(input_ids, attention_mask)):
    real = tokens[keep]
    ids[row, width - len(real) :] = real
    segments[row, width - len(real) :] = 1
  return ids, segments


def _decode_halves(
  model,
  decode_model,
  max_new_tokens: int,
  sampling: SamplingConfig,
  eos_ids: tuple[int, ...],
  pad_id: int,
  image_keys: tuple[str, ...],
):
  """(prefill, step), pure functions: the prompt (images included) into a fresh cache and the first token;
  then one token per call. `generate` runs both in one program, `stream_generate` calls them one by one.
  The prefill applies `model`, the step `decode_model` (same cache layout; see `decoding_layout`)."""
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def prefill(params, ids, segments, images, rng):
    batch, prompt_len = ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    # Prompts are left-aligned, so the last column is every row's last real token: only it needs logits.
    logits, cache = model.apply(
      {"params": params}, ids, segment_ids=segments, cache=cache, logits_to_keep=1, **dict(zip(image_keys, images))
    )
    rng, step_rng = jax.random.split(rng)
    token = sample_token(logits[:, -1], step_rng, sampling)
    return token, cache, jnp.isin(token, eos), rng

  def step(params, token, cache, done, rng):
    logits, cache = decode_model.apply({"params": params}, token[:, None], cache=cache)
    rng, step_rng = jax.random.split(rng)
    token = sample_token(logits[:, -1], step_rng, sampling)
    token = jnp.where(done, pad_id, token)
    return token, cache, done | jnp.isin(token, eos), rng

  return prefill, step


@functools.lru_cache(maxsize=32)
def _compiled_generate(
  model,
  decode_model,
  max_new_tokens: int,
  sampling: SamplingConfig,
  eos_ids: tuple[int, ...],
  pad_id: int,
  image_keys: tuple[str, ...],
):
  prefill, step = _decode_halves(model, decode_model, max_new_tokens, sampling, eos_ids, pad_id, image_keys)

  def run(params, decode_params, ids, segments, images, rng):
    token, cache, done, rng = prefill(params, ids, segments, images, rng)
    out = jnp.full((ids.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def cond(state):
      produced, _, _, done, _, _ = state
      return (produced < max_new_tokens) & ~jnp.all(done)

    def body(state):
      produced, token, cache, done, out, rng = state
      token, cache, done, rng = step(decode_params, token, cache, done, rng)
      out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], produced, axis=1)
      return produced + 1, token, cache, done, out, rng

    return jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, done, out, rng))[4]

  return jax.jit(run)


def generate(
  model,
  params,
  input_ids,
  *,
  max_new_tokens: int,
  attention_mask=None,
  pixel_values=None,
  tile_mask=None,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  rng: jax.Array | None = None,
  eos_token_id=None,
  pad_token_id: int | None = None,
  pad_to_multiple_of: int | None = None,
) -> jnp.ndarray:
  """Generates `max_new_tokens` tokens per row: int32 [B, max_new_tokens], greedy by default.

  input_ids [B, L] with attention_mask [B, L] (1 = real token; any padding side). After a row emits
  EOS (the config's eos ids unless `eos_token_id` is given) the rest of it is `pad_token_id`.
  pixel_values / tile_mask are passed to multimodal models for the prefill. pad_to_multiple_of rounds
  the (left-padded) prompt width up, so that batches of similar length share one compiled program.
  """
  prepared = _prepare(
    model,
    input_ids,
    max_new_tokens=max_new_tokens,
    attention_mask=attention_mask,
    pixel_values=pixel_values,
    tile_mask=tile_mask,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    rng=rng,
    eos_token_id=eos_token_id,
    pad_token_id=pad_token_id,
    pad_to_multiple_of=pad_to_multiple_of,
  )
  decode_model, decode_params = decoding_layout(model, params)
  run = _compiled_generate(
    model, decode_model, prepared.max_new_tokens, prepared.sampling, prepared.eos_ids, prepared.pad, prepared.image_keys
  )
  return run(params, decode_params, prepared.ids, prepared.segments, prepared.images, prepared.rng)


@dataclasses.dataclass(frozen=True)
class _Prepared:
  """generate / stream_generate arguments, checked and turned into device arrays + static settings."""

  ids: jnp.ndarray
  segments: jnp.ndarray
  images: tuple[jnp.ndarray, ...]
  image_keys: tuple[str, ...]
  rng: jax.Array
  max_new_tokens: int
  sampling: SamplingConfig
  eos_ids: tuple[int, ...]
  pad: int


def _prepare(
  model,
  input_ids,
  *,
  max_new_tokens,
  attention_mask,
  pixel_values,
  tile_mask,
  temperature,
  top_k,
  top_p,
  rng,
  eos_token_id,
  pad_token_id,
  pad_to_multiple_of,
) -> _Prepared:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  cfg = language_config(model)
  eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
  eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (tuple, list)) else ([] if eos is None else [eos])))
  pad = (
    pad_token_id
    if pad_token_id is not None
    else (cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0))
  )
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  ids, segments = left_align(input_ids, mask, pad, pad_to_multiple_of)
  images = {k: v for k, v in (("pixel_values", pixel_values), ("tile_mask", tile_mask)) if v is not None}
  sampling = SamplingConfig(temperature, top_k, top_p)
  if rng is None:
    if not sampling.greedy:
      raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: rng=jax.random.key(seed)")
    rng = jax.random.key(0)
  return _Prepared(
    jnp.asarray(ids),
    jnp.asarray(segments),
    tuple(jnp.asarray(v) for v in images.values()),
    tuple(images),
    rng,
    int(max_new_tokens),
    sampling,
    eos_ids,
    int(pad),
  )


@functools.lru_cache(maxsize=32)
def _compiled_stream(
  model,
  decode_model,
  max_new_tokens: int,
  sampling: SamplingConfig,
  eos_ids: tuple[int, ...],
  pad_id: int,
  image_keys: tuple[str, ...],
):
  """(prefill, step) of `_compiled_generate`'s program, compiled separately (same PRNG splits)."""
  prefill, step = _decode_halves(model, decode_model, max_new_tokens, sampling, eos_ids, pad_id, image_keys)
  return jax.jit(prefill), jax.jit(step, donate_argnums=(2,))


def stream_generate(
  model,
  params,
  input_ids,
  *,
  max_new_tokens: int,
  attention_mask=None,
  pixel_values=None,
  tile_mask=None,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  rng: jax.Array | None = None,
  eos_token_id=None,
  pad_token_id: int | None = None,
  pad_to_multiple_of: int | None = None,
) -> Iterator[np.ndarray]:
  """`generate`, one step at a time: yields int32 [B] numpy arrays, the next token of every row.

  Same arguments and the same tokens as `generate` (also when sampling with the same `rng`): column t
  of `generate`'s output is the t-th array yielded. Rows that already emitted EOS yield `pad_token_id`;
  the iteration stops once every row has emitted EOS or after `max_new_tokens` arrays. Each token is
  copied to the host as it is produced, which is what streaming needs and costs one sync per token.
  """
  prepared = _prepare(
    model,
    input_ids,
    max_new_tokens=max_new_tokens,
    attention_mask=attention_mask,
    pixel_values=pixel_values,
    tile_mask=tile_mask,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    rng=rng,
    eos_token_id=eos_token_id,
    pad_token_id=pad_token_id,
    pad_to_multiple_of=pad_to_multiple_of,
  )
  decode_model, decode_params = decoding_layout(model, params)
  prefill, step = _compiled_stream(
    model, decode_model, prepared.max_new_tokens, prepared.sampling, prepared.eos_ids, prepared.pad, prepared.image_keys
  )
  token, cache, done, rng = prefill(params, prepared.ids, prepared.segments, prepared.images, prepared.rng)
  for produced in range(1, prepared.max_new_tokens + 1):
    host_token, host_done = jax.device_get((token, done))
    yield np.asarray(host_token)
    if produced == prepared.max_new_tokens or np.all(host_done):
      return
    token, cache, done, rng = step(decode_params, token, cache, done, rng)
