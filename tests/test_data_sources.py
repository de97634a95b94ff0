"""Data sources: LLaVA files, the synthetic set, the TFDS ArrayRecord round trip, and blends."""

import io
import json
import pickle
import struct
import zlib
from collections import Counter

import grain
import numpy as np
import pytest
from PIL import Image, ImageDraw

from nvlm_jax.data import records, synthetic
from nvlm_jax.data.blend import BlendedSource
from nvlm_jax.data.llava import LlavaFormatError, LlavaSource
from nvlm_jax.data.records import BadSampleError, bad_sample_from_image_error, validate_record
from nvlm_jax.data.synthetic import COLORS, SyntheticSource
from nvlm_jax.data.tfds_builder import ArrayRecordSource, convert, main
from nvlm_jax.vision import image_io, tiling


def png_bytes(size=(20, 12), color=(10, 200, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, format="PNG")
  return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header claims width x height (no pixel data): a decompression bomb for the probe."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def reason_of(record, **kwargs):
  try:
    validate_record(record, **kwargs)
  except BadSampleError as e:
    assert record["id"] in str(e)
    return e.reason
  return None


# ---- LLaVA files ---------------------------------------------------------------------------------------
GOOD_ENTRIES = [
  {
    "id": "one",
    "image": "a.png",
    "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A box."}],
  },
  {
    "id": 7,
    "images": ["a.png", "sub/b.png"],
    "conversations": [
      {"from": "system", "value": "Answer the questions."},
      {"from": "human", "value": "Compare <image> and <image>."},
      {"from": "gpt", "value": "Same."},
      {"from": "human", "value": "Sure?"},
      {"from": "gpt", "value": "Yes."},
    ],
  },
  {
    "id": "text",
    "system": "Be brief.",
    "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
  },
  {
    "id": "nomark",
    "image": "a.png",
    "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Green."}],
  },
]


@pytest.fixture
def image_root(tmp_path):
  root = tmp_path / "images"
  (root / "sub").mkdir(parents=True)
  (root / "a.png").write_bytes(png_bytes())
  (root / "sub" / "b.png").write_bytes(png_bytes((9, 31), (200, 0, 0)))
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  (root / "truncated.png").write_bytes(png_bytes((64, 64))[:60])  # header ok, pixel data cut
  (root / "bomb.png").write_bytes(png_header_only(40_000, 40_000))
  return root


def test_llava_json_and_jsonl_parse_the_same(tmp_path, image_root):
  (tmp_path / "d.json").write_text(json.dumps(GOOD_ENTRIES))
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(e) for e in GOOD_ENTRIES) + "\n\n")
  as_json = LlavaSource(tmp_path / "d.json", image_root)
  as_jsonl = LlavaSource(tmp_path / "d.jsonl", image_root)
  assert len(as_json) == len(as_jsonl) == 4
  for i in range(4):
    a, b = as_json[i], as_jsonl[i]
    assert a["messages"] == b["messages"] and a["images"] == b["images"] and a["id"] == b["id"]
    validate_record(a)  # all good entries validate, images included

  one, two, text, nomark = (as_json[i] for i in range(4))
  assert one == {
    "id": "one",
    "source": "d",
    "images": [str(image_root / "a.png")],
    "messages": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A box."}],
  }
  assert two["id"] == "7" and two["images"] == [str(image_root / "a.png"), str(image_root / "sub" / "b.png")]
  assert [m["role"] for m in two["messages"]] == ["system", "user", "assistant", "user", "assistant"]
  assert text["images"] == [] and text["messages"][0] == {"role": "system", "content": "Be brief."}
  # one image, no <image> mark: prepended to the first user turn (HF chat() / Megatron convention)
  assert nomark["messages"][0]["content"] == "<image>\nDescribe."
  assert as_json[-1]["id"] == "nomark"
  with pytest.raises(IndexError):
    as_json[4]


def test_llava_source_works_in_grain_and_pickles(tmp_path, image_root):
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(e) for e in GOOD_ENTRIES))
  source = LlavaSource(tmp_path / "d.jsonl", image_root)
  source[0]  # opens the file handle, which must not travel in the pickle
  clone = pickle.loads(pickle.dumps(source))
  assert [clone[i] for i in range(4)] == [source[i] for i in range(4)]
  ds = grain.MapDataset.source(source).map(lambda r: r["id"])
  assert list(ds) == ["one", "7", "text", "nomark"]


def test_llava_malformed_entries_give_reasons(tmp_path, image_root):
  ok_turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
  lines = [
    json.dumps({"id": "missing", "image": "nope.png", "conversations": ok_turns}),
    json.dumps({"id": "corrupt", "image": "corrupt.png", "conversations": ok_turns}),
    json.dumps({"id": "bomb", "image": "bomb.png", "conversations": ok_turns}),
    '{"id": "broken", "conversations": [',  # invalid JSON line
    json.dumps(["not", "an", "object"]),
    json.dumps({"id": "speaker", "conversations": [{"from": "alien", "value": "hi"}]}),
    json.dumps({"id": "value", "conversations": [{"from": "human", "value": 3}]}),
    json.dumps({"id": "both", "image": "a.png", "images": ["a.png"], "conversations": ok_turns}),
    json.dumps(
      {
        "id": "twomissing",
        "images": ["a.png", "sub/b.png"],
        "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}],
      }
    ),
    json.dumps({"id": "extra_mark", "conversations": ok_turns}),
    json.dumps({"id": "empty", "conversations": []}),
    json.dumps(
      {"id": "no_answer", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "  "}]}
    ),
    json.dumps({"id": "order", "conversations": [{"from": "gpt", "value": "A."}, {"from": "human", "value": "Q"}]}),
    json.dumps(
      {"id": "mark_in_answer", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image>"}]}
    ),
    json.dumps({"id": "truncated", "image": "truncated.png", "conversations": ok_turns}),
  ]
  (tmp_path / "bad.jsonl").write_text("\n".join(lines))
  source = LlavaSource(tmp_path / "bad.jsonl", image_root)
  got = {source[i]["id"]: reason_of(source[i]) for i in range(len(source))}  # __getitem__ never raises
  assert got == {
    "missing": "missing_image",
    "corrupt": "corrupt_image",
    "bomb": "decompression_bomb",
    "bad:3": "malformed_conversation",
    "bad:4": "malformed_conversation",
    "speaker": "malformed_conversation",
    "value": "malformed_conversation",
    "both": "malformed_conversation",
    "twomissing": "image_count_mismatch",
    "extra_mark": "image_count_mismatch",
    "empty": "empty_conversation",
    "no_answer": "empty_conversation",
    "order": "malformed_conversation",
    "mark_in_answer": "malformed_conversation",
    "truncated": None,  # the header probe passes; the full decode in the pipeline catches it (below)
  }
  with pytest.raises(BadSampleError, match=r"bad\.jsonl:4: invalid JSON"):  # file:line in the message
    validate_record(source[3])
  assert reason_of(source[0], check_images=False) is None

  truncated = source[len(source) - 1]
  with pytest.raises(image_io.ImageError) as info:
    image_io.load_image(truncated["images"][0])
  assert bad_sample_from_image_error("truncated", info.value).reason == "corrupt_image"
  for bad_source, reason in [
    (png_header_only(9000, 9000), "decompression_bomb"),
    (b"", "missing_image"),
    (str(image_root / "nope.png"), "missing_image"),
    (b"junk", "corrupt_image"),
  ]:
    with pytest.raises(image_io.ImageError) as info:
      image_io.load_image(bad_source)
    err = bad_sample_from_image_error("x", info.value, index=0)
    assert err.reason == reason and pickle.loads(pickle.dumps(err)).reason == reason


def test_record_limits_and_schema_errors():
  record = {
    "id": "r",
    "source": "s",
    "images": [png_bytes()],
    "messages": [{"role": "user", "content": "<image>\n" + "x" * 50}, {"role": "assistant", "content": "y"}],
  }
  validate_record(record)
  assert reason_of(record, max_text_chars=20) == "too_long"
  assert reason_of(record, max_images=0) == "too_long"
  assert reason_of({**record, "images": [b""]}) == "missing_image"
  big = {**record, "images": [png_header_only(9000, 9000)]}  # 81 Mpx: over our limit, under PIL's
  assert reason_of(big) == "decompression_bomb"
  assert reason_of(big, max_image_pixels=10**8) is None  # only the header is read, never the pixels
  assert reason_of({**record, "images": [123]}) == "malformed_conversation"
  assert reason_of({**record, "messages": "hi"}) == "malformed_conversation"
  with pytest.raises(ValueError, match="unknown bad-sample reason"):
    BadSampleError("whatever", "id")
  assert records.BAD_SAMPLE_REASONS >= {
    "missing_image",
    "corrupt_image",
    "image_count_mismatch",
    "empty_conversation",
    "malformed_conversation",
    "too_long",
    "decompression_bomb",
  }


def test_llava_file_level_errors_name_the_file(tmp_path):
  (tmp_path / "broken.json").write_text('[{"id": 1},\n {"id": 2,,}]')
  with pytest.raises(LlavaFormatError, match=r"broken\.json:2:"):
    LlavaSource(tmp_path / "broken.json")
  (tmp_path / "dict.json").write_text('{"id": 1}')
  with pytest.raises(LlavaFormatError, match=r"dict\.json: top level is a dict"):
    LlavaSource(tmp_path / "dict.json")
  with pytest.raises(FileNotFoundError, match="nothere"):
    LlavaSource(tmp_path / "nothere.json")


# ---- synthetic -------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_per_seed_and_index():
  a, b = SyntheticSource(40, seed=3), SyntheticSource(40, seed=3)
  forward = [a[i] for i in range(40)]
  assert [b[i] for i in reversed(range(40))] == forward[::-1]  # order of access does not matter
  other = SyntheticSource(40, seed=4)
  assert sum(other[i] == forward[i] for i in range(40)) == 0
  assert pickle.loads(pickle.dumps(a))[7] == forward[7]
  for record in forward:
    validate_record(record)
    assert record["source"] == "synthetic"
    assert all(im[:8] == b"\x89PNG\r\n\x1a\n" for im in record["images"])


def test_synthetic_sizes_vary_and_mix_text_only():
  source = SyntheticSource(300, seed=0, image_size_range=(56, 224), text_only_fraction=0.25)
  plans = [source.plan(i) for i in range(len(source))]
  scenes = [p.scene for p in plans if p.scene is not None]
  assert 0.15 < 1 - len(scenes) / len(plans) < 0.35
  sizes = {(s.width, s.height) for s in scenes}
  aspects = [s.width / s.height for s in scenes]
  assert len(sizes) > 0.9 * len(scenes) and min(aspects) < 0.5 and max(aspects) > 2.0
  assert all(56 <= v <= 224 for s in scenes for v in (s.width, s.height))
  assert len({s.grid for s in scenes}) >= 8
  record = source[next(i for i, p in enumerate(plans) if p.scene is not None)]
  with Image.open(io.BytesIO(record["images"][0])) as im:
    assert im.size == (scenes[0].width, scenes[0].height)


def _render_text_like(item, crop_box):
  """Independently draws ``item``'s text at its spot on a blank canvas the size of crop_box."""
  x0, y0, x1, y1 = crop_box
  canvas = Image.new("RGB", (x1 - x0, y1 - y0), synthetic.BOX_FILL)
  ImageDraw.Draw(canvas).text(
    (item.origin[0] - x0, item.origin[1] - y0), item.text, fill=synthetic.TEXT_COLOR, font=synthetic.font(item.font_px)
  )
  return np.asarray(canvas)


def _check_answer(scene, image, question, answer, tile_size):
  pixels = np.asarray(image)
  if question == synthetic.Q_NUMBER:
    x0, y0, x1, y1 = scene.number.box
    inner = (x0 + 1, y0 + 1, x1, y1)  # inside the 1 px outline
    drawn = pixels[inner[1] : inner[3], inner[0] : inner[2]]
    assert answer.isdigit() and answer == scene.number.text
    np.testing.assert_array_equal(drawn, _render_text_like(scene.number, inner))
    assert (drawn.min(axis=-1) < 128).any()  # there is dark ink in the box
  elif question == synthetic.Q_TILE:
    cols, rows = tiling.select_grid(scene.width, scene.height, max_tiles=6, image_size=tile_size)
    assert (cols, rows) == scene.grid and cols * rows > 1
    (circle,) = [s for s in scene.shapes if (s.kind, s.color) == ("circle", "red")]
    cx, cy = circle.center
    assert tuple(pixels[cy, cx]) == COLORS["red"]
    k = int(answer.removeprefix("tile "))
    # the tile the model sees as <tile_k> holds the whole circle
    x0, y0, x1, y1 = circle.box
    col, row = (k - 1) % cols, (k - 1) // cols
    assert col * scene.width / cols <= x0 and x1 < (col + 1) * scene.width / cols
    assert row * scene.height / rows <= y0 and y1 < (row + 1) * scene.height / rows
    tiles, grid = tiling.tile_image(image, image_size=tile_size, max_tiles=6)
    assert grid.num_tiles == cols * rows + 1
    # the circle's centre, mapped into tile k of the stretched image, is (still) red there
    tx = int(cx * cols * tile_size / scene.width) - col * tile_size
    ty = int(cy * rows * tile_size / scene.height) - row * tile_size
    assert 0 <= tx < tile_size and 0 <= ty < tile_size
    seen = np.asarray(tiles[k - 1]).astype(int)[ty, tx]
    assert np.abs(seen - np.array(COLORS["red"])).max() < 60, (seen, k)
  elif question.startswith("What color is the "):
    kind = question.removeprefix("What color is the ").rstrip("?")
    (shape,) = [s for s in scene.shapes if s.kind == kind]
    assert tuple(pixels[shape.center[1], shape.center[0]]) == COLORS[answer]
  elif question.startswith("How many "):
    plural = question.split()[2]
    kind = next(k for k, p in synthetic.SHAPE_PLURALS.items() if p == plural)
    shapes = [s for s in scene.shapes if s.kind == kind]
    assert answer == str(len(shapes))
    for s in shapes:
      assert tuple(pixels[s.center[1], s.center[0]]) == COLORS[s.color]
  elif question == synthetic.Q_WORD:
    assert answer == scene.word.text and answer in synthetic.WORDS
    w = scene.word
    x0, y0, x1, y1 = synthetic.font(w.font_px).getbbox(w.text)
    box = (w.origin[0] + x0, w.origin[1] + y0, w.origin[0] + x1, w.origin[1] + y1)
    drawn = pixels[box[1] : box[3], box[0] : box[2]]
    assert (drawn.min(axis=-1) < 128).mean() > 0.05
  else:
    raise AssertionError(f"unexpected question {question!r}")


def _question_kind(question):
  if question == synthetic.Q_NUMBER:
    return "number"
  if question == synthetic.Q_TILE:
    return "tile"
  if question == synthetic.Q_WORD:
    return "word"
  return "color" if question.startswith("What color") else "count"


def _check_text_answer(question, answer):
  if question.startswith("What is "):
    expr = question.removeprefix("What is ").rstrip("?").replace("times", "*")
    assert answer == str(eval(expr, {}))  # noqa: S307 - our own "a op b" strings
  elif question.startswith("Repeat the word "):
    assert answer == question.split()[-1].rstrip(".")
  elif question.startswith("Spell the word "):
    assert answer == question.split()[3][::-1]
  else:
    assert answer == str(len(question.split()[-1].rstrip("?")))


@pytest.mark.parametrize("size, tile_size, n", [("tiny", None, 80), ("tiny", 28, 30), ("paper", None, 6)])
def test_synthetic_answers_are_verifiable_from_pixels(size, tile_size, n):
  source = SyntheticSource(n, seed=11, size=size, tile_size=tile_size, text_only_fraction=0.1, red_circle_fraction=0.8)
  asked = Counter()
  for i in range(n):
    plan, record = source.plan(i), source[i]
    users = [m["content"] for m in record["messages"] if m["role"] == "user"]
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    assert [q for q, _ in plan.qa] == [u.removeprefix("<image>\n") for u in users]
    assert [a for _, a in plan.qa] == answers
    if plan.scene is None:
      for q, a in plan.qa:
        _check_text_answer(q, a)
      continue
    image = image_io.load_image(record["images"][0])
    if size == "paper":
      assert min(image.size) >= 448
    for question, answer in plan.qa:
      _check_answer(plan.scene, image, question, answer, source.tile_size)
      asked[_question_kind(question)] += 1
  if n >= 80:  # every kind of image question was exercised
    assert set(asked) == {"number", "tile", "color", "count", "word"}, asked


def test_corpus_texts_cover_what_the_generator_says():
  texts = synthetic.corpus_texts(50)
  corpus = "\n".join(texts)
  for token in ("<|im_start|>", "<|im_end|>", "<image>", "<Image>", "<tile_1>", "<tile_global_thumbnail>"):
    assert token in texts
  source = SyntheticSource(200, seed=5)
  for i in range(200):
    for m in source[i]["messages"]:
      for word in m["content"].replace("<image>\n", "").split():
        if not any(ch.isdigit() for ch in word):
          assert word.strip("?.") in corpus, word


# ---- TFDS ArrayRecord --------------------------------------------------------------------------------
def test_tfds_round_trip_random_access(tmp_path, image_root):
  entries = GOOD_ENTRIES + [{"id": "gone", "image": "nope.png", "conversations": GOOD_ENTRIES[0]["conversations"]}]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
  (tmp_path / "d.jsonl").open("a").write('\n{"id": "broken"\n')
  llava = LlavaSource(tmp_path / "d.jsonl", image_root)
  synth = SyntheticSource(25, seed=2)
  builder_dir, dropped = convert([llava, synth], tmp_path / "out")
  assert dropped == {"train": Counter()}

  expected = []
  for i in range(len(llava)):
    record = dict(llava[i])
    record["images"] = [open(p, "rb").read() if p.endswith(("a.png", "b.png")) else b"" for p in record["images"]]
    expected.append(record)
  expected += [synth[i] for i in range(len(synth))]

  for where in (builder_dir, tmp_path / "out"):
    source = ArrayRecordSource(where, "train")
    assert len(source) == len(expected) == 31
  order = np.random.default_rng(0).permutation(len(expected))
  assert [source[int(i)] for i in order] == [expected[int(i)] for i in order]
  assert source[-1] == expected[-1]
  assert [reason_of(source[i]) for i in (4, 5)] == ["missing_image", "malformed_conversation"]
  clone = pickle.loads(pickle.dumps(source))
  assert list(grain.MapDataset.source(clone).map(lambda r: r["id"]))[:2] == ["one", "7"]

  with pytest.raises(FileExistsError):
    convert([synth], tmp_path / "out")
  with pytest.raises(KeyError, match="validation"):
    ArrayRecordSource(builder_dir, "validation")


def test_tfds_cli_llava_plus_synthetic_drop_bad(tmp_path, image_root, capsys):
  entries = GOOD_ENTRIES + [{"id": "gone", "image": "nope.png", "conversations": GOOD_ENTRIES[0]["conversations"]}]
  (tmp_path / "d.json").write_text(json.dumps(entries))
  out = tmp_path / "out"
  assert (
    main(
      [
        "--llava",
        str(tmp_path / "d.json"),
        "--image-root",
        str(image_root),
        "--synthetic",
        "7",
        "--out",
        str(out),
        "--name",
        "mix",
        "--drop-bad",
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert "wrote 11 records" in printed and "dropped 1 x missing_image" in printed
  source = ArrayRecordSource(out, dataset_name="mix")
  assert [source[i]["id"] for i in range(4)] == ["one", "7", "text", "nomark"]
  assert Counter(source[i]["source"] for i in range(len(source))) == {"d": 4, "synthetic": 7}


# ---- blends --------------------------------------------------------------------------------------------
class Numbers:
  """Tiny random-access source: record i has id f"{name}{i}"."""

  def __init__(self, name, n):
    self.name, self.n = name, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return {"id": f"{self.name}{i}", "source": "orig", "messages": [], "images": []}


def test_blend_proportions_counts_and_determinism():
  sources = [Numbers("a", 1000), Numbers("b", 50), Numbers("text", 3000), Numbers("never", 10)]
  weights = [0.5, 0.3, 0.2, 0.0]
  blend = BlendedSource(sources, weights, seed=1, num_samples=5000, block_size=512)
  drawn = [blend[i] for i in range(5000)]
  counts = Counter(r["source"] for r in drawn)
  for name, w in zip(["a", "b", "text"], weights):
    assert abs(counts[name] / 5000 - w) < 0.03, counts
  assert counts["never"] == 0
  assert blend.source_counts() == {**counts, "never": 0}
  assert blend.source_counts(1234) == {**Counter(r["source"] for r in drawn[:1234]), "never": 0}
  # within a source, elements come in order and wrap around (b has 50 elements, drawn ~1500 times)
  b_ids = [r["id"] for r in drawn if r["source"] == "b"]
  assert b_ids[:60] == [f"b{i % 50}" for i in range(60)]
  a_ids = [r["id"] for r in drawn if r["source"] == "a"]
  assert len(a_ids) > 1000 and len(set(a_ids[:1000])) == 1000  # one full pass before any repeat

  same = BlendedSource(sources, weights, seed=1, num_samples=5000, block_size=512)
  assert [same[i] for i in reversed(range(5000))] == drawn[::-1]
  assert pickle.loads(pickle.dumps(blend))[4321] == drawn[4321]
  other = BlendedSource(sources, weights, seed=2, num_samples=5000, block_size=512)
  assert [other[i]["id"] for i in range(200)] != [r["id"] for r in drawn[:200]]
  assert len(grain.MapDataset.source(blend)) == 5000


def test_blend_of_real_sources_and_errors(tmp_path):
  synth = SyntheticSource(30, seed=0, text_only_fraction=0.0)
  text = SyntheticSource(30, seed=1, text_only_fraction=1.0, name="text_only")
  blend = BlendedSource([synth, text], [1, 1], seed=0)
  assert len(blend) == 60
  for i in range(len(blend)):
    record = blend[i]
    validate_record(record)
    assert (record["source"] == "text_only") == (record["images"] == [])
  with pytest.raises(ValueError, match="unique"):
    BlendedSource([synth, synth], [1, 1])
  with pytest.raises(ValueError, match="weights"):
    BlendedSource([synth], [-1])
  with pytest.raises(ValueError, match="empty"):
    BlendedSource([synth, Numbers("z", 0)], [1, 1])
  with pytest.raises(IndexError):
    blend[60]
