"""Tile tags, chat template, tokenizer and Processor (text + images -> NVLM-D inputs)."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from nvlm_jax.processing import chat_template as ct
from nvlm_jax.processing.processor import (
  IGNORE_INDEX,
  ImageCountMismatchError,
  Processor,
  SampleTooLongError,
  tokens_per_tile,
)
from nvlm_jax.processing.tile_tags import YI_GLOBAL_TILE_TAG, expand_image_text, tile_tags
from nvlm_jax.processing.tokenizer import (
  ENDOFTEXT,
  IM_END,
  IM_START,
  IMG_CONTEXT,
  VISION_PAD,
  NvlmTokenizer,
  build_tiny_tokenizer,
)
from nvlm_jax.vision.image_io import ImageError
from nvlm_jax.vision.tiling import TileGrid, preprocess_image

GLOBAL = "<tile_global_thumbnail>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  build_tiny_tokenizer(None, vocab_size=420, out_dir=out)
  return out


@pytest.fixture(scope="module")
def tok(tok_dir):
  return NvlmTokenizer.from_pretrained(tok_dir)


def make_processor(tok, **kw):
  kw.setdefault("image_size", 56)  # 4 tokens per tile: (56/14)^2 * 0.5^2
  return Processor(tok, patch_size=14, downsample_ratio=0.5, **kw)


def noise(w, h, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def runs_of(ids, token_id):
  """Lengths of the maximal runs of token_id in ids."""
  runs, n = [], 0
  for i in list(ids) + [None]:
    if i == token_id:
      n += 1
    elif n:
      runs.append(n)
      n = 0
  return runs


# ---------------------------------------------------------------- tile tags ---------------------------------
def test_tile_tag_strings_per_format():
  grid = TileGrid(3, 2, True, 448)
  assert tile_tags(grid, "none") == [""] * 7
  assert tile_tags(grid, "1d") == [f"<tile_{k}>" for k in range(1, 7)] + [GLOBAL]
  assert tile_tags(grid, "2d_grid") == [
    "<tile_x1_y1>",
    "<tile_x2_y1>",
    "<tile_x3_y1>",
    "<tile_x1_y2>",
    "<tile_x2_y2>",
    "<tile_x3_y2>",
    GLOBAL,
  ]
  assert tile_tags(grid, "2d_bbox") == [
    "<box> (0, 0), (448, 448) </box>",
    "<box> (448, 0), (896, 448) </box>",
    "<box> (896, 0), (1344, 448) </box>",
    "<box> (0, 448), (448, 896) </box>",
    "<box> (448, 448), (896, 896) </box>",
    "<box> (896, 448), (1344, 896) </box>",
    GLOBAL,
  ]
  assert tile_tags(grid, "1d", global_tag=YI_GLOBAL_TILE_TAG)[-1] == "<tile_global>"


def test_tile_tags_single_tile_and_no_thumbnail():
  single = TileGrid(1, 1, False, 448)
  for fmt in ("1d", "2d_grid", "2d_bbox"):
    assert tile_tags(single, fmt) == [GLOBAL]
  no_thumb = TileGrid(2, 2, False, 448)
  assert tile_tags(no_thumb, "1d") == ["<tile_1>", "<tile_2>", "<tile_3>", GLOBAL]  # reference slicing
  assert tile_tags(no_thumb, "2d_grid") == ["<tile_x1_y1>", "<tile_x2_y1>", "<tile_x1_y2>", "<tile_x2_y2>"]
  with pytest.raises(ValueError, match="unknown tile_tag_format"):
    tile_tags(single, "3d")


def test_expand_image_text():
  text = expand_image_text(["<tile_1>", GLOBAL], context_token="<c>", tokens_per_tile=2)
  assert text == "<Image><tile_1><c><c><tile_global_thumbnail><c><c></Image>"
  assert expand_image_text(["<a>"], context_token="<c>", tokens_per_tile=0) == "<Image><a></Image>"


def test_tokens_per_tile():
  assert tokens_per_tile(448, 14, 0.5) == 256
  assert tokens_per_tile(28, 14, 0.5) == 1
  assert tokens_per_tile(56, 14, 0.5) == 4
  with pytest.raises(ValueError, match="multiple of patch_size"):
    tokens_per_tile(450, 14, 0.5)
  with pytest.raises(ValueError, match="positive integer"):
    tokens_per_tile(42, 14, 0.5)


# ---------------------------------------------------------------- chat template -----------------------------
def test_chatml_rendering_and_targets():
  msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
  segs = ct.render_chat(msgs)
  text = ct.render_text(segs)
  assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
  assert [text[a:b] for a, b in ct.target_char_spans(segs)] == ["Yo<|im_end|>"]
  segs = ct.render_chat(msgs, target_turn_newline=True)
  assert [ct.render_text(segs)[a:b] for a, b in ct.target_char_spans(segs)] == ["Yo<|im_end|>\n"]
  prompt = ct.render_text(
    ct.render_chat(msgs[:1], add_generation_prompt=True, system_prompt=ct.QWEN2_DEFAULT_SYSTEM_PROMPT)
  )
  assert prompt == (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  )
  yi = ct.render_chat(msgs, chat_format="nvlm-yi-34b", bos_token="<s>")
  assert ct.render_text(yi).startswith("<s><|im_start|>user\n")
  with pytest.raises(ValueError, match="bos_token"):
    ct.render_chat(msgs, chat_format="nvlm-yi-34b")
  with pytest.raises(ValueError, match="already starts with a system message"):
    ct.render_chat([{"role": "system", "content": "a"}] + msgs, system_prompt="b")
  with pytest.raises(ValueError, match="unknown role 'bot'"):
    ct.render_chat([{"role": "bot", "content": "a"}])
  with pytest.raises(ValueError, match="unknown chat format"):
    ct.render_chat(msgs, chat_format="llama3")


def test_chat_text_matches_transformers_template(tok_dir, tok):
  from transformers import AutoTokenizer

  hf = AutoTokenizer.from_pretrained(tok_dir)
  msgs = [
    {"role": "system", "content": "Answer the questions."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
  ]
  proc = make_processor(tok)
  sample = proc.encode_sample(msgs, add_generation_prompt=True)
  assert sample.text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert hf(sample.text, add_special_tokens=True)["input_ids"] == sample.input_ids.tolist()


# ---------------------------------------------------------------- tokenizer ---------------------------------
def test_tiny_tokenizer_is_deterministic_and_loadable(tok_dir, tok):
  again = build_tiny_tokenizer(None, vocab_size=420)
  assert again.backend.to_str() == tok.backend.to_str()
  assert [tok.token_to_id(t) for t in (ENDOFTEXT, IM_START, IM_END, VISION_PAD, IMG_CONTEXT)] == [0, 1, 2, 3, 4]
  assert tok.pad_id == 0 and tok.eos_id == 2 and tok.bos_id is None
  assert tok.vocab_size == 420
  text = "<|im_start|>user\nçà 日本 <tile_1><|vision_pad|><|vision_pad|></Image><|im_end|>\n"
  assert tok.decode(tok.encode(text)) == text
  assert not tok.is_special("<tile_1>") and tok.is_special(VISION_PAD)
  config = json.loads((tok_dir / "tokenizer_config.json").read_text())
  assert config["eos_token"] == IM_END and config["pad_token"] == ENDOFTEXT
  from transformers import PreTrainedTokenizerFast

  hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
  assert hf(text)["input_ids"] == tok.encode(text)
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tok.token_to_id("<nope>")
  with pytest.raises(ValueError, match="below the byte alphabet"):
    build_tiny_tokenizer(["a"], vocab_size=100)


# ---------------------------------------------------------------- processor: one sample ---------------------
@pytest.mark.parametrize("fmt", ["none", "1d", "2d_grid", "2d_bbox"])
def test_image_expansion_and_token_counts(tok, fmt):
  proc = make_processor(tok, tile_tag_format=fmt)
  msgs = [{"role": "user", "content": "<image>\nDescribe."}]
  out = proc(msgs, noise(100, 60), add_generation_prompt=True)
  ids = out["input_ids"][0]
  assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
  assert "labels" not in out
  grid = TileGrid(3, 2, True, 56)
  tags = tile_tags(grid, fmt)
  expansion = "<Image>" + "".join(t + VISION_PAD * 4 for t in tags) + "</Image>"
  text = f"<|im_start|>user\n{expansion}\nDescribe.<|im_end|>\n<|im_start|>assistant\n"
  assert proc.decode(ids) == text
  assert ids.tolist() == tok.encode(text)
  assert int((ids == proc.image_context_id).sum()) == 7 * proc.tokens_per_tile
  assert runs_of(ids, proc.image_context_id) == ([28] if fmt == "none" else [4] * 7)
  assert out["tile_mask"].tolist() == [[True] * 7]
  assert out["pixel_values"].shape == (1, 7, 56, 56, 3)
  np.testing.assert_array_equal(out["pixel_values"][0], preprocess_image(noise(100, 60), image_size=56)[0])


def test_labels_are_exactly_assistant_tokens_and_im_end(tok):
  proc = make_processor(tok)
  msgs = [
    {"role": "system", "content": "Answer the questions."},
    {"role": "user", "content": "<image>\nWhat color is the bus?"},
    {"role": "assistant", "content": "The bus is red."},
    {"role": "user", "content": "How many people?"},
    {"role": "assistant", "content": "There are 3 people."},
  ]
  out = proc(msgs, [noise(40, 40)])
  ids, labels = out["input_ids"][0], out["labels"][0]
  assert labels.dtype == np.int32 and labels.shape == ids.shape
  target = labels != IGNORE_INDEX
  assert np.array_equal(labels[target], ids[target])
  expected = tok.encode("The bus is red.") + [tok.eos_id] + tok.encode("There are 3 people.") + [tok.eos_id]
  assert labels[target].tolist() == expected
  # each target run is preceded by "<|im_start|>assistant\n" and followed by an untrained "\n"
  starts = np.flatnonzero(target & ~np.concatenate([[False], target[:-1]]))
  ends = np.flatnonzero(target & ~np.concatenate([target[1:], [False]]))
  assert len(starts) == 2
  prefix = tok.encode("<|im_start|>assistant\n")
  for s, e in zip(starts, ends):
    assert ids[s - len(prefix) : s].tolist() == prefix
    assert ids[e] == tok.eos_id and ids[e + 1] == tok.encode("\n")[0] and labels[e + 1] == IGNORE_INDEX
  assert proc.decode(labels) == "The bus is red.<|im_end|>There are 3 people.<|im_end|>"
  megatron_style = make_processor(tok, target_turn_newline=True)(msgs, [noise(40, 40)])["labels"][0]
  assert megatron_style[ends + 1].tolist() == ids[ends + 1].tolist()  # the "\n" after each <|im_end|>


def test_text_only_and_content_parts(tok):
  proc = make_processor(tok)
  out = proc([{"role": "user", "content": "Hello"}])
  assert out["pixel_values"].shape == (1, 7, 56, 56, 3) and not out["pixel_values"].any()
  assert not out["tile_mask"].any()
  parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat?"}]}]
  plain = [{"role": "user", "content": "<image>\nWhat?"}]
  img = noise(30, 90)
  np.testing.assert_array_equal(proc(parts, [img])["input_ids"], proc(plain, [img])["input_ids"])


def test_image_count_mismatch_errors(tok):
  proc = make_processor(tok)
  two_marks = [{"role": "user", "content": "<image><image> compare"}]
  with pytest.raises(
    ImageCountMismatchError, match=r"conversation: 2 <image> mark\(s\) in the messages but 1 image\(s\)"
  ) as info:
    proc(two_marks, [noise(20, 20)])
  assert isinstance(info.value, ValueError) and info.value.reason == "image_count_mismatch"
  batch = [[{"role": "user", "content": "<image> a"}], [{"role": "user", "content": "no image"}]]
  with pytest.raises(ValueError, match=r"sample 1: 0 <image> mark\(s\) in the messages but 1 image\(s\)"):
    proc(batch, [[noise(20, 20)], [noise(20, 20)]])
  with pytest.raises(ValueError, match="one images entry per conversation"):
    proc(batch, [noise(20, 20)])


def test_other_message_errors(tok):
  proc = make_processor(tok)
  with pytest.raises(ValueError, match="image-context token"):
    proc([{"role": "user", "content": "hi <|vision_pad|>"}])
  with pytest.raises(ValueError, match="not allowed in assistant content"):
    proc([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}], [noise(9, 9)])
  with pytest.raises(ValueError, match="already starts with a system message"):
    proc([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], system_prompt="x")
  with pytest.raises(ImageError, match=r"sample 0, image 0: <4 bytes>: not a recognised image format"):
    proc([[{"role": "user", "content": "<image>"}]], [[b"junk"]])
  with pytest.raises(ImageError, match=r"image 0: .*nope.png: image file not found") as info:
    proc([{"role": "user", "content": "<image>"}], ["/nonexistent/nope.png"])
  assert info.value.reason == "missing_image"


def test_sample_too_long_and_per_call_tile_cap(tok):
  proc = make_processor(tok)
  msgs = [{"role": "user", "content": "<image>\nDescribe."}]
  img = noise(100, 60)
  full = proc.encode_sample(msgs, [img])
  assert full.num_tiles == 7
  with pytest.raises(
    SampleTooLongError,
    match=rf"needs {len(full.input_ids)} tokens \(with 7 image tiles\), "
    r"more than the limit of 40",
  ) as info:
    proc(msgs, [img], max_length=40)
  assert isinstance(info.value, ValueError) and info.value.limit == 40 and info.value.reason == "too_long"
  copy = pickle.loads(pickle.dumps(info.value))
  assert (copy.length, copy.limit, str(copy)) == (info.value.length, 40, str(info.value))
  fewer = proc(msgs, [img], max_tiles_per_image=2)  # the data pipeline's retry
  assert fewer["tile_mask"][0].sum() == 3  # (2, 1) grid + thumbnail
  one = proc(msgs, [img], max_tiles_per_image=1)
  assert one["tile_mask"][0].sum() == 1
  assert int((one["input_ids"] == proc.image_context_id).sum()) == 4


def test_multi_image_tiles_in_order_and_budget(tok):
  proc = make_processor(tok)
  a, b = noise(100, 60, seed=1), noise(60, 100, seed=2)
  msgs = [{"role": "user", "content": "<image> and <image>: same?"}]
  out = proc(msgs, [a, b])
  # Megatron's multi-image rule: 6 // 2 = 3 tiles max per image -> (2,1)+thumb and (1,2)+thumb
  assert out["tile_mask"][0].tolist() == [True] * 6 + [False]
  pa, _ = preprocess_image(a, image_size=56, max_tiles=3)
  pb, _ = preprocess_image(b, image_size=56, max_tiles=3)
  np.testing.assert_array_equal(out["pixel_values"][0, :6], np.concatenate([pa, pb]))
  assert runs_of(out["input_ids"][0], proc.image_context_id) == [4] * 6
  three = proc([{"role": "user", "content": "<image><image><image>"}], [a, b, a])
  assert three["tile_mask"][0].sum() == 3  # 3 x (2+1) > 7 slots, so one tile each
  with pytest.raises(SampleTooLongError, match="8 image tiles"):
    proc([{"role": "user", "content": "<image>" * 8}], [a] * 8)


# ---------------------------------------------------------------- processor: batches -----------------------
def test_batch_padding_right_and_left(tok):
  proc = make_processor(tok)
  short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
  long = [{"role": "user", "content": "<image>\nWhat is shown in this picture?"}]
  img = noise(120, 120)
  singles = [proc.encode_sample(short), proc.encode_sample(long, [img])]
  out = proc([short, long], [None, [img]])
  n0, n1 = (len(s.input_ids) for s in singles)
  assert out["input_ids"].shape == (2, max(n0, n1)) and n1 > n0
  assert out["attention_mask"].sum(1).tolist() == [n0, n1]
  assert out["input_ids"][0, :n0].tolist() == singles[0].input_ids.tolist()
  assert (out["input_ids"][0, n0:] == tok.pad_id).all() and tok.pad_id == tok.token_to_id(ENDOFTEXT)
  assert (out["labels"][0, n0:] == IGNORE_INDEX).all() and (out["labels"][1] == IGNORE_INDEX).all()
  assert out["tile_mask"].tolist() == [[False] * 7, [True] * 5 + [False] * 2]  # 120x120 -> 2x2 + thumbnail
  assert not out["pixel_values"][0].any() and not out["pixel_values"][1, 5:].any()
  left = proc([short, long], [None, [img]], padding_side="left", pad_to_multiple_of=64)
  assert left["input_ids"].shape[1] % 64 == 0 and left["input_ids"].shape[1] >= n1
  width = left["input_ids"].shape[1]
  assert left["input_ids"][0, width - n0 :].tolist() == singles[0].input_ids.tolist()
  assert left["attention_mask"][0, : width - n0].sum() == 0
  fixed = proc([short], padding="max_length", max_length=n0 + 5)
  assert fixed["input_ids"].shape == (1, n0 + 5)


# ---------------------------------------------------------------- from_pretrained ---------------------------
def test_from_pretrained_nvlm_d_layout(tok_dir, tok, tmp_path):
  for f in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / f).write_bytes((tok_dir / f).read_bytes())
  config = {
    "architectures": ["NVLM_D"],
    "force_image_size": 56,
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "max_dynamic_patch": 4,
    "min_dynamic_patch": 1,
    "use_thumbnail": True,
    "vision_config": {"patch_size": 14, "image_size": 448},
    "nvlm_jax": {"tile_tag_format": "2d_grid", "max_tiles_per_sample": 9, "some_model_key": 1},
  }
  (tmp_path / "config.json").write_text(json.dumps(config))
  proc = Processor.from_pretrained(tmp_path)
  assert (proc.image_size, proc.tokens_per_tile, proc.max_tiles_per_image, proc.max_tiles_per_sample) == (56, 4, 4, 9)
  assert proc.tile_tag_format == "2d_grid" and proc.image_context_token == VISION_PAD
  msgs = [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Ok"}]
  img = noise(100, 60)
  same = make_processor(tok, max_tiles_per_image=4, max_tiles_per_sample=9, tile_tag_format="2d_grid")
  got, want = proc(msgs, [img]), same(msgs, [img])
  assert got.keys() == want.keys()
  for key in got:
    np.testing.assert_array_equal(got[key], want[key])
  assert "<tile_x1_y1>" in proc.decode(got["input_ids"][0])
  assert Processor.from_pretrained(tmp_path, tile_tag_format="none").tile_tag_format == "none"
  with pytest.raises(FileNotFoundError, match="config.json"):
    Processor.from_pretrained(tok_dir)


def test_from_pretrained_internvl_layout(tok_dir, tok, tmp_path):
  for f in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / f).write_bytes((tok_dir / f).read_bytes())
  config = {
    "model_type": "internvl",
    "image_token_id": tok.token_to_id(IMG_CONTEXT),
    "downsample_ratio": 0.5,
    "vision_config": {"image_size": [56, 56], "patch_size": [14, 14]},
  }
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "preprocessor_config.json").write_text(
    json.dumps({"max_patches": 2, "min_patches": 1, "crop_to_patches": True})
  )
  proc = Processor.from_pretrained(tmp_path)
  out = proc([{"role": "user", "content": "<image>\nHi"}], [noise(100, 60)])
  text = proc.decode(out["input_ids"][0])
  assert text == "<|im_start|>user\n<img>" + IMG_CONTEXT * 12 + "</img>\nHi<|im_end|>\n"


def test_yi_format_and_fusion_variants(tok):
  with_bos = NvlmTokenizer(tok.backend, bos_token=ENDOFTEXT)
  proc = make_processor(with_bos, chat_format="nvlm-yi-34b", global_tile_tag=YI_GLOBAL_TILE_TAG)
  out = proc([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A"}], [noise(20, 20)])
  assert out["input_ids"][0, 0] == with_bos.bos_id and out["labels"][0, 0] == IGNORE_INDEX
  assert "<Image><tile_global>" in proc.decode(out["input_ids"][0])
  with pytest.raises(ValueError, match="needs a bos_token"):
    make_processor(tok, chat_format="nvlm-yi-34b")
  with pytest.raises(ValueError, match="unknown fusion"):
    make_processor(tok, fusion="q")
  with pytest.raises(ValueError, match="must be an added special token"):
    make_processor(tok, image_context_token="tile")
  with pytest.raises(ValueError, match="not in the vocabulary"):
    make_processor(tok, image_context_token="<tile_1>")
