"""Streaming generation and the chat command.

`stream_generate` must give exactly `generate`'s tokens (greedy and sampled, padded batches, early EOS,
images); the chat command must print exactly the text of `generate`'s greedy tokens, decoded piece by
piece without breaking multi-byte characters. The checkpoint is a tiny random transformers Qwen2 saved
with our tiny tokenizer, so the command runs from a real directory as a user would run it.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm
import torch
from test_vision import random_params

from nvlm_jax import chat, presets
from nvlm_jax.config import DecoderConfig
from nvlm_jax.evaluation.generate_answers import load_processor
from nvlm_jax.fusion.nvlm_d import NVLMD
from nvlm_jax.generation import generate, stream_generate
from nvlm_jax.language.decoder import CausalLM
from nvlm_jax.models import load_model
from nvlm_jax.processing.tokenizer import build_tiny_tokenizer

MULTIBYTE_TEXT = "naïve café — 東京 🙂 done"


@pytest.fixture(scope="module")
def tiny_lm():
  cfg = DecoderConfig(
    vocab_size=96,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    rope_theta=10_000.0,
    eos_token_id=2,
    pad_token_id=0,
  )
  model = CausalLM(cfg)
  return model, random_params(model, jnp.zeros((1, 4), jnp.int32), std=0.3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A HF Qwen2 checkpoint dir with the tiny tokenizer beside it (what `--checkpoint` points at)."""
  directory = tmp_path_factory.mktemp("qwen2_chat")
  tokenizer = build_tiny_tokenizer(vocab_size=384, out_dir=directory)
  config = rm.tiny_qwen2_config(
    vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, num_hidden_layers=2
  )
  model = rm.build_causal_lm(config, seed=3)
  with torch.no_grad():  # logit 0 for EOS never beats the best of 380 random logits: replies run long
    model.lm_head.weight[tokenizer.eos_id] = 0.0
  rm.save(model, directory)
  return directory


def _stream(model, params, ids, **kwargs) -> np.ndarray:
  return np.stack(list(stream_generate(model, params, ids, **kwargs)), axis=1)


def _check_stream_equals_generate(model, params, ids, max_new_tokens, **kwargs) -> np.ndarray:
  """Column t of generate's output is the t-th streamed token; generate only pads after the stream stops."""
  expected = np.asarray(generate(model, params, ids, max_new_tokens=max_new_tokens, **kwargs))
  streamed = _stream(model, params, ids, max_new_tokens=max_new_tokens, **kwargs)
  assert streamed.shape[1] <= max_new_tokens
  np.testing.assert_array_equal(streamed, expected[:, : streamed.shape[1]])
  pad = kwargs.get("pad_token_id", 0)
  assert (expected[:, streamed.shape[1] :] == pad).all(), "generate went on after every row had stopped"
  return streamed


# One prompt batch for the text-only tests (left- and right-padded rows), so compilations are shared.
IDS = np.array([[5, 9, 14, 3, 7, 0, 0], [0, 0, 11, 4, 8, 21, 6]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], np.int32)


def test_stream_equals_generate_greedy_with_left_and_right_padding(tiny_lm):
  model, params = tiny_lm
  out = _check_stream_equals_generate(model, params, IDS, 10, attention_mask=MASK, eos_token_id=())
  assert out.shape == (2, 10)


def test_stream_stops_when_every_row_has_emitted_eos(tiny_lm):
  model, params = tiny_lm
  free = np.asarray(generate(model, params, IDS, attention_mask=MASK, max_new_tokens=10, eos_token_id=()))
  # Make the 3rd token of row 0 and the 5th of row 1 the EOS: the stream must stop after at most 5 tokens.
  eos = (int(free[0, 2]), int(free[1, 4]))
  out = _check_stream_equals_generate(model, params, IDS, 10, attention_mask=MASK, eos_token_id=eos)
  first_eos = [next(k for k, t in enumerate(row) if t in eos) for row in out]
  assert out.shape[1] == max(first_eos) + 1 <= 5
  assert (out[0, first_eos[0] + 1 :] == 0).all()


def test_stream_equals_generate_when_sampling_with_the_same_key(tiny_lm):
  model, params = tiny_lm
  out = _check_stream_equals_generate(
    model,
    params,
    IDS,
    10,
    attention_mask=MASK,
    rng=jax.random.key(7),
    eos_token_id=(),
    temperature=0.8,
    top_k=20,
    top_p=0.9,
  )
  greedy = np.asarray(generate(model, params, IDS, attention_mask=MASK, max_new_tokens=10, eos_token_id=()))
  assert (out != greedy).any()  # it did sample


def test_stream_equals_generate_with_images():
  cfg = presets.get_preset("tiny_nvlm_d")
  model = NVLMD(cfg)
  per_tile, size = cfg.tokens_per_tile, cfg.vision.image_size
  ids = np.array([[7, 8] + [cfg.image_token_id] * per_tile + [9, 10, 11]], np.int32)
  pixels = np.random.default_rng(0).normal(size=(1, 2, size, size, 3)).astype(np.float32)
  tile_mask = np.array([[True, False]])
  params = random_params(model, jnp.asarray(ids), seed=1)
  _check_stream_equals_generate(
    model, params, ids, 6, pixel_values=pixels, tile_mask=tile_mask, eos_token_id=(), pad_token_id=0
  )


def test_incremental_decoder_never_splits_a_character():
  tokenizer = build_tiny_tokenizer(vocab_size=300)
  ids = tokenizer.encode(MULTIBYTE_TEXT)
  assert len(ids) > len(MULTIBYTE_TEXT)  # several characters span more than one token
  decoder = chat.IncrementalDecoder(tokenizer)
  pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
  assert "".join(pieces) == MULTIBYTE_TEXT
  assert not any(chat.REPLACEMENT_CHAR in p for p in pieces)


def test_incremental_decoder_drops_special_tokens_and_flushes_garbage_bytes():
  tokenizer = build_tiny_tokenizer(vocab_size=300)
  decoder = chat.IncrementalDecoder(tokenizer)
  lone = tokenizer.encode("é")[:1]  # the first byte of a two-byte character, never completed
  ids = tokenizer.encode("ab") + [tokenizer.eos_id] + lone
  pieces = [decoder.push(t) for t in ids]
  assert "".join(pieces) == "ab"
  assert decoder.flush() == chat.REPLACEMENT_CHAR


def test_attach_images_prepends_marks_or_checks_them():
  assert chat.attach_images("hi", 0) == "hi"
  assert chat.attach_images("hi", 2) == "<image>\n<image>\nhi"
  assert chat.attach_images("a <image> b", 1) == "a <image> b"
  with pytest.raises(ValueError, match="1 <image> mark.*2 image"):
    chat.attach_images("a <image> b", 2)


@pytest.fixture(scope="module")
def loaded(checkpoint):
  model, params = load_model(checkpoint)
  return model, params, load_processor(checkpoint, model)


def test_one_shot_chat_prints_the_greedy_tokens_of_generate(checkpoint, loaded):
  out = io.StringIO()
  prompt = "What is 7 + 35? " + MULTIBYTE_TEXT
  assert (
    chat.main(
      [
        "--checkpoint",
        str(checkpoint),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "24",
        "--system",
        "Answer the questions.",
      ],
      out=out,
    )
    == 0
  )

  model, params, processor = loaded
  batch = processor(
    [{"role": "user", "content": prompt}], add_generation_prompt=True, system_prompt="Answer the questions."
  )
  tokens = np.asarray(
    generate(
      model,
      params,
      batch["input_ids"],
      attention_mask=batch["attention_mask"],
      max_new_tokens=24,
      eos_token_id=processor.tokenizer.eos_id,
    )
  )[0].tolist()
  if processor.tokenizer.eos_id in tokens:
    tokens = tokens[: tokens.index(processor.tokenizer.eos_id)]
  expected = processor.tokenizer.decode(tokens, skip_special_tokens=True)
  assert len(tokens) > 3 and expected
  assert out.getvalue() == expected + "\n"


def test_interactive_chat_keeps_the_history_and_resets(loaded, monkeypatch):
  model, params, processor = loaded
  session = chat.ChatSession(model, params, processor, max_new_tokens=6)
  prompts = []
  real = session.prompt_arrays

  def spy(messages):
    prompts.append([dict(m) for m in messages])
    return real(messages)

  monkeypatch.setattr(session, "prompt_arrays", spy)
  lines = iter(["hello", "", "and then?", "/reset", "again", "/exit", "never read"])
  out = io.StringIO()
  chat.interactive(session, read=lambda _: next(lines), out=out)
  assert [len(p) for p in prompts] == [1, 3, 1]  # turn 2 sees turn 1 and its answer; /reset forgets them
  assert prompts[1][0] == {"role": "user", "content": "hello"} and prompts[1][1]["role"] == "assistant"
  assert prompts[1][2] == {"role": "user", "content": "and then?"}
  assert out.getvalue().count("assistant> ") == 3 and "[conversation cleared]" in out.getvalue()
  assert next(lines) == "never read"


def test_chat_refuses_images_for_a_text_only_model(checkpoint, tmp_path):
  with pytest.raises(ValueError, match="text-only"):
    chat.main(
      ["--checkpoint", str(checkpoint), "--image", str(tmp_path / "x.png"), "--prompt", "hi"], out=io.StringIO()
    )
