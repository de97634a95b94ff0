"""The grain training pipeline: batch contract, loss masks, packing, blend, determinism, resume, sharding over
processes, bad samples and tile degradation, the global-array output and the inspect CLI."""

import io
import json
import struct
import zlib

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from nvlm_jax.data import pipeline, synthetic
from nvlm_jax.data.encode import EncodeRecord, degradation_steps, next_tile_cap, parse_degradation
from nvlm_jax.data.synthetic import SyntheticSource
from nvlm_jax.processing.processor import Processor
from nvlm_jax.processing.tokenizer import build_tiny_tokenizer
from nvlm_jax.training import batch as batch_lib

SEQ_LEN = 256
MAX_TILES = 7


@pytest.fixture(scope="module")
def processor():
  tokenizer = build_tiny_tokenizer(synthetic.corpus_texts(300))
  return Processor(tokenizer, image_size=56, patch_size=7)  # 16 tokens per tile, 6 + 1 tiles


def synthetic_config(num_samples=400, weight=1.0, **overrides):
  config = pipeline.default_synthetic_data_config("tiny")
  config.sources = [{"kind": "synthetic", "weight": weight, "num_samples": num_samples, "seed": 0, "size": "tiny"}]
  config.global_batch_size = 4
  config.batch_prefetch = 0
  for key, value in overrides.items():
    config[key] = value
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      if isinstance(x[key], np.ndarray):
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
      else:
        assert x[key] == y[key], key


def source_record(sample_id: str, sources: dict):
  """The record a sample id refers to ("<name>:<seed>:<index>" for the synthetic set)."""
  name, _, index = sample_id.rsplit(":", 2)
  return sources[name][int(index)]


def segments(batch):
  """(row, k, positions) for every packed sample of the batch."""
  for r in range(batch["segment_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    for k in range(1, int(seg.max()) + 1):
      yield r, k, np.flatnonzero(seg == k)


# ---- the batch contract ----------------------------------------------------------------------------------
def test_batches_follow_the_training_contract(processor):
  it = pipeline.make_train_iterator(synthetic_config(), processor, seed=0)
  for batch in take(it, 4):
    batch_lib.check_batch(batch, multimodal=True, batch_size=4, seq_len=SEQ_LEN, max_tiles=MAX_TILES, tile_size=56)
    batch_lib.check_batch_values(batch)
    assert batch["segment_ids"].max() >= 1
    # every real tile has its placeholders in the same row, and vice versa
    placeholders = (batch["input_ids"] == processor.image_context_id).sum(axis=1)
    np.testing.assert_array_equal(placeholders, batch["tile_mask"].sum(axis=1) * processor.tokens_per_tile)
    # tiles are packed to the front, padding tiles are zero
    mask = batch["tile_mask"]
    assert np.all(np.sort(~mask, axis=1, kind="stable") == ~mask)
    assert not np.any(batch["pixel_values"][~mask])
  it.close()


def test_loss_mask_is_exactly_the_assistant_answers_and_targets_are_next_tokens(processor):
  sources = {"synthetic": SyntheticSource(400, 0, size="tiny", tile_size=56)}
  it = pipeline.make_train_iterator(synthetic_config(), processor, seed=1, include_sample_ids=True)
  tok, checked = processor.tokenizer, 0
  for batch in take(it, 5):
    for r, k, pos in segments(batch):
      record = source_record(batch["sample_ids"][r][k - 1], sources)
      answers = [m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant"]
      mask = batch["loss_mask"][r, pos] > 0
      assert tok.decode(batch["targets"][r, pos][mask].tolist()) == "".join(answers)
      # contiguous positions, restarting at 0; targets are the next input token inside the sample
      np.testing.assert_array_equal(batch["positions"][r, pos], np.arange(len(pos)))
      assert np.all(np.diff(pos) == 1)
      np.testing.assert_array_equal(batch["targets"][r, pos[:-1]], batch["input_ids"][r, pos[1:]])
      # the sample's own last token ("\n" after the final <|im_end|>) is the last target: no target
      # crosses into the next packed sample
      assert tok.decode([int(batch["targets"][r, pos[-1]])]) == "\n" and not mask[-1]
      assert tok.decode(batch["input_ids"][r, pos[:1]].tolist()) == "<|im_start|>"
      checked += 1
    pad = batch["segment_ids"] == 0
    assert not batch["loss_mask"][pad].any() and not batch["positions"][pad].any()
  assert checked >= 20
  it.close()


@pytest.mark.parametrize("pack", ["all", "text_only", "none"])
def test_packing_modes(processor, pack):
  it = pipeline.make_train_iterator(synthetic_config(pack=pack), processor, seed=0, include_sample_ids=True)
  batches = take(it, 6)
  per_row = [int(b["segment_ids"][r].max()) for b in batches for r in range(4)]
  for b in batches:
    for r in range(4):
      n_samples, n_tiles = int(b["segment_ids"][r].max()), int(b["tile_mask"][r].sum())
      assert n_tiles <= MAX_TILES and (b["segment_ids"][r] > 0).sum() <= SEQ_LEN
      if pack == "text_only" and n_samples > 1:
        assert n_tiles == 0, "an image sample shared its row under pack='text_only'"
  if pack == "none":
    assert set(per_row) == {1}
  else:
    assert max(per_row) >= 2
  stats = it.stats()
  assert stats["samples"] == sum(per_row) and stats["rows"] == 24
  it.close()


def test_text_only_samples_pack_densely(processor):
  config = synthetic_config()
  config.sources[0]["text_only_fraction"] = 1.0
  it = pipeline.make_train_iterator(config, processor, seed=0)
  batch = next(it)
  assert "pixel_values" in batch and not batch["tile_mask"].any()
  assert batch["segment_ids"].max(axis=1).min() >= 3  # ~40-token samples: several per 256-token row
  assert (batch["segment_ids"] > 0).mean() > 0.7
  it.close()


# ---- blend, determinism, sharding -----------------------------------------------------------------------
def test_blend_proportions_follow_the_weights(processor):
  config = synthetic_config()
  config.sources = [
    {
      "kind": "synthetic",
      "weight": 3.0,
      "num_samples": 300,
      "seed": 1,
      "size": "tiny",
      "name": "a",
      "text_only_fraction": 1.0,
    },
    {
      "kind": "synthetic",
      "weight": 1.0,
      "num_samples": 300,
      "seed": 2,
      "size": "tiny",
      "name": "b",
      "text_only_fraction": 1.0,
    },
  ]
  it = pipeline.make_train_iterator(config, processor, seed=0)
  take(it, 25)
  stats = it.stats()
  a, b = stats["sources"]["a"]["samples"], stats["sources"]["b"]["samples"]
  assert a + b == stats["samples"] > 400
  assert abs(a / (a + b) - 0.75) < 0.06, (a, b)
  it.close()


def test_same_seed_same_batches_other_seed_other_batches(processor):
  runs = []
  for seed in (0, 0, 1):
    it = pipeline.make_train_iterator(synthetic_config(batch_prefetch=2), processor, seed=seed)
    runs.append(take(it, 3))
    it.close()
  assert_batches_equal(runs[0], runs[1])
  assert not np.array_equal(runs[0][0]["input_ids"], runs[2][0]["input_ids"])


def test_two_processes_get_disjoint_shards_that_cover_everything(processor):
  n = 60
  config = synthetic_config(num_samples=n, num_epochs=1)
  seen = []
  for process_index in (0, 1):
    it = pipeline.make_train_iterator(
      config,
      processor,
      global_batch_size=8,
      process_index=process_index,
      process_count=2,
      seed=3,
      include_sample_ids=True,
    )
    ids = [i for batch in it for row in batch["sample_ids"] for i in row]
    assert it.stats()["samples"] == len(ids)
    seen.append(ids)
    it.close()
  assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == {f"synthetic:0:{i}" for i in range(n)}
  assert abs(len(seen[0]) - len(seen[1])) <= 1


# ---- resume -----------------------------------------------------------------------------------------
def test_resume_after_k_batches_equals_continuing(processor, tmp_path):
  config = synthetic_config(batch_prefetch=2)
  it = pipeline.make_train_iterator(config, processor, seed=5)
  take(it, 3)
  state = it.get_state()
  json.dumps(state)  # plain JSON, as grain's checkpoint handler writes it
  stats_at_k = it.stats()
  expected = take(it, 4)
  expected_stats = it.stats()
  it.close()

  resumed = pipeline.make_train_iterator(config, processor, seed=5)
  resumed.set_state(state)
  assert resumed.stats() == stats_at_k
  assert_batches_equal(take(resumed, 4), expected)
  assert resumed.stats() == expected_stats
  resumed.close()


def test_resume_through_orbax_composite_checkpoint(processor, tmp_path):
  import orbax.checkpoint as ocp

  config = synthetic_config()
  it = pipeline.make_train_iterator(config, processor, seed=2)
  take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(
      2,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave({"w": np.arange(3)}), data=grain.checkpoint.CheckpointSave(it)
      ),
    )
    manager.wait_until_finished()
  expected = take(it, 3)
  it.close()

  resumed = pipeline.make_train_iterator(config, processor, seed=2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(
      2,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.arange(3)}), data=grain.checkpoint.CheckpointRestore(resumed)
      ),
    )
  assert_batches_equal(take(resumed, 3), expected)
  resumed.close()


def test_two_workers_give_the_same_batches_and_resume_across_worker_counts(processor):
  """Worker processes start in a few seconds each here (spawn + importing jax)."""
  from nvlm_jax.data.packing import parent_state

  config = synthetic_config(worker_count=0)
  it0 = pipeline.make_train_iterator(config, processor, seed=4)
  reference = take(it0, 5)
  state0 = it0.get_state()  # saved by a run without workers
  reference += take(it0, 1)
  it0.close()

  it2 = pipeline.make_train_iterator(config, processor, seed=4, worker_count=2)
  first = take(it2, 2)
  state2 = it2.get_state()
  # the grain state we rebuild from the element count is the one grain itself reached
  packer = it2._parent
  assert parent_state(packer._consumed, 2) == packer._parent.get_state()
  rest = take(it2, 3)
  assert_batches_equal(first + rest, reference[:5])  # skip markers keep the map 1:1, so order is worker-independent
  it2.set_state(state2)
  assert_batches_equal(take(it2, 3), reference[2:5])
  it2.set_state(state0)  # a 0-worker checkpoint resumed with 2 workers
  assert_batches_equal(take(it2, 1), reference[5:])
  it2.close()

  resumed0 = pipeline.make_train_iterator(config, processor, seed=4)
  resumed0.set_state(state2)  # and a 2-worker checkpoint resumed without workers
  assert_batches_equal(take(resumed0, 4), reference[2:])
  resumed0.close()


# ---- bad samples and tile degradation ---------------------------------------------------------------
def png_bytes(size, color=(10, 200, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, format="PNG")
  return buffer.getvalue()


def forged_png_header(width: int, height: int) -> bytes:
  """A tiny file whose PNG header claims width x height: a decompression bomb."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def turn(question, answer):
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


DEGRADE_ANSWER = "The wide picture is green."


@pytest.fixture
def bad_llava(tmp_path):
  (tmp_path / "small.png").write_bytes(png_bytes((40, 40)))
  (tmp_path / "wide.png").write_bytes(png_bytes((168, 112)))  # 3x2 grid -> 6 tiles + thumbnail
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  (tmp_path / "bomb.png").write_bytes(forged_png_header(40_000, 40_000))
  entries = [
    {"id": "good1", "image": "small.png", "conversations": turn("<image>\nWhat color?", "Green.")},
    {"id": "good2", "conversations": turn("What is 2 + 2?", "4")},
    {"id": "missing", "image": "nope.png", "conversations": turn("<image>\nWhat?", "Nothing.")},
    {"id": "corrupt", "image": "corrupt.png", "conversations": turn("<image>\nWhat?", "Nothing.")},
    {"id": "bomb", "image": "bomb.png", "conversations": turn("<image>\nWhat?", "Nothing.")},
    {"id": "mismatch", "image": "small.png", "conversations": turn("<image> and <image>?", "Two.")},
    {"id": "empty", "image": "small.png", "conversations": turn("<image>\nWhat?", "  ")},
    {"id": "malformed", "conversations": "not a list"},
    {"id": "degrade", "image": "wide.png", "conversations": turn("<image>\nDescribe it.", DEGRADE_ANSWER)},
    {"id": "drop", "image": "small.png", "conversations": turn("<image>\n" + "Tell me a long story. " * 30, "No.")},
    {"id": "good3", "conversations": turn("Say hi.", "Hi.")},
  ]
  path = tmp_path / "mixed.jsonl"
  path.write_text("\n".join(json.dumps(e) for e in entries) + "\n{broken json\n")
  return path


def llava_config(path, **overrides):
  config = synthetic_config(num_epochs=1, shuffle=False, **overrides)
  config.sources = [{"kind": "llava", "weight": 1.0, "path": str(path), "name": "mixed"}]
  return config


def degrade_seq_len(processor, path):
  """A seq_len that the 'degrade' sample exceeds at 6 tiles per image but meets at 4."""
  from nvlm_jax.data.llava import LlavaSource

  record = next(r for r in LlavaSource(path) if r["id"] == "degrade")
  wide = EncodeRecord(processor, seq_len=10_000, max_tiles=MAX_TILES)
  images = [Image.open(record["images"][0]).convert("RGB")]
  lengths = {}
  for cap in (6, 4):
    processor_cap = Processor(processor.tokenizer, image_size=56, patch_size=7, max_tiles_per_image=cap)
    lengths[cap] = len(
      EncodeRecord(processor_cap, seq_len=10_000, max_tiles=MAX_TILES).encode(record, images)["input_ids"]
    )
  assert wide.encode(record, images)["pixel_values"].shape[0] == 7 and lengths[6] > lengths[4]
  return lengths[4]


def test_every_bad_sample_kind_is_skipped_and_counted(processor, bad_llava):
  seq_len = degrade_seq_len(processor, bad_llava)
  it = pipeline.make_train_iterator(
    llava_config(bad_llava), processor, seq_len=seq_len, seed=0, include_sample_ids=True
  )
  kept = [i for batch in it for row in batch["sample_ids"] for i in row]
  stats = it.stats()
  it.close()
  assert sorted(kept) == ["degrade", "good1", "good2", "good3"]
  expected = {
    "missing_image": 1,
    "corrupt_image": 1,
    "decompression_bomb": 1,
    "image_count_mismatch": 1,
    "empty_conversation": 1,
    "malformed_conversation": 2,
    "too_long": 1,
  }
  assert stats["skipped"] == expected
  assert stats["sources"]["mixed"]["skipped"] == expected
  assert stats["degraded"] == stats["sources"]["mixed"]["degraded"] == 1
  assert stats["samples"] == 4


def test_tile_degradation_keeps_the_whole_answer(processor, bad_llava):
  seq_len = degrade_seq_len(processor, bad_llava)
  it = pipeline.make_train_iterator(
    llava_config(bad_llava, pack="none"), processor, seq_len=seq_len, seed=0, include_sample_ids=True
  )
  for batch in it:
    for r, ids in enumerate(batch["sample_ids"]):
      if ids == ["degrade"]:
        row = batch
        break
    else:
      continue
    break
  it.close()
  mask = row["loss_mask"][r] > 0
  assert processor.tokenizer.decode(row["targets"][r][mask].tolist()) == DEGRADE_ANSWER + "<|im_end|>"
  assert row["tile_mask"][r].sum() == 5  # 2x2 + thumbnail after degrading 6 -> 4 tiles per image
  assert (row["segment_ids"][r] > 0).sum() == seq_len  # fits exactly: nothing was cut


def test_degradation_map():
  assert degradation_steps(6) == [6, 4, 2, 1]
  assert degradation_steps(12) == [12, 8, 6, 4, 2, 1]
  assert next_tile_cap(5) == 4 and next_tile_cap(3) == 2 and next_tile_cap(1) == 1
  assert parse_degradation("6:4, 4:2,2:1") == {6: 4, 4: 2, 2: 1}
  with pytest.raises(ValueError, match="must map"):
    parse_degradation({4: 6})


def test_encoder_never_raises_for_bad_records(processor):
  encode = EncodeRecord(processor, seq_len=SEQ_LEN, max_tiles=MAX_TILES)
  bad = [
    None,
    {"id": 3},
    {"id": "x", "source": "s", "messages": "hi", "images": []},
    {
      "id": "x",
      "source": "s",
      "messages": [{"role": "user", "content": "<|vision_pad|>?"}, {"role": "assistant", "content": "ok"}],
      "images": [],
    },
    {
      "id": "y",
      "source": "s",
      "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "ok"}],
      "images": [b""],
    },
  ]
  reasons = [encode(r)["skip"] for r in bad]
  assert reasons == ["malformed_conversation"] * 4 + ["missing_image"]


def test_text_only_pipeline_skips_images(processor):
  config = synthetic_config(max_tiles=0)
  it = pipeline.make_train_iterator(config, processor, seed=0)
  batch = next(it)
  batch_lib.check_batch(batch, multimodal=False)
  assert it.stats()["skipped"]["too_long"] > 0
  it.close()


# ---- other source kinds, mesh output, config checks, CLI -----------------------------------------------
def test_array_record_source_in_a_blend(processor, tmp_path):
  from nvlm_jax.data.tfds_builder import convert

  convert([SyntheticSource(12, 7, size="tiny", tile_size=56)], tmp_path / "tfds")
  config = synthetic_config(num_epochs=1, shuffle=False)
  config.sources = [{"kind": "array_record", "weight": 1.0, "path": str(tmp_path / "tfds"), "name": "ar"}]
  it = pipeline.make_train_iterator(config, processor, seed=0, include_sample_ids=True)
  ids = [i for batch in it for row in batch["sample_ids"] for i in row]
  assert sorted(ids) == sorted(f"synthetic:7:{i}" for i in range(12))
  assert it.stats()["sources"]["ar"]["samples"] == 12
  it.close()


def test_global_arrays_on_a_mesh(processor):
  from nvlm_jax.sharding import create_mesh

  mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  config = synthetic_config()
  host = pipeline.make_train_iterator(config, processor, seed=0)
  glob = pipeline.make_train_iterator(config, processor, mesh, seed=0, global_arrays=True)
  expected, got = next(host), next(glob)
  for key, value in expected.items():
    assert isinstance(got[key], jax.Array)
    assert got[key].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(got[key]), value)
  host.close()
  glob.close()
  with pytest.raises(ValueError, match="not divisible by the mesh"):
    pipeline.make_train_iterator(config, processor, mesh, global_batch_size=6)


def test_trainer_call_convention_and_model_checks(processor):
  from nvlm_jax.presets import tiny_nvlm_d

  config = synthetic_config()
  model = tiny_nvlm_d()
  with pytest.raises(ValueError, match="image placeholder id"):
    pipeline.make_train_iterator(config, processor, None, model_config=model, process_index=0, process_count=1, seed=0)
  matching = model.replace(image_token_id=processor.image_context_id)
  it = pipeline.make_train_iterator(
    config, processor, None, model_config=matching, process_index=0, process_count=1, seed=0
  )
  assert next(it)["input_ids"].shape == (4, SEQ_LEN)
  it.close()
  with pytest.raises(ValueError, match="needs a Processor"):
    pipeline.make_train_iterator(config, None)
  with pytest.raises(ValueError, match="kind"):
    pipeline.make_blend({"sources": [{"kind": "parquet"}]})


def test_inspect_cli(tmp_path, capsys):
  from nvlm_jax.data import inspect as inspect_cli

  out = tmp_path / "tiles.png"
  assert inspect_cli.main(["--synthetic", "10", "--num", "3", "--save-tiles", str(out), "--batch"]) == 0
  text = capsys.readouterr().out
  assert "[[" in text and "<|im_end|>]]" in text
  assert "image placeholders: 112 (7 tiles x 16)" in text
  assert "grid 3x2 + thumbnail" in text and "row 0:" in text
  sheet = Image.open(out)
  assert sheet.size[0] > 4 * 56 and sheet.size[1] > 2 * 56


def test_skip_log_is_rate_limited(caplog):
  from nvlm_jax.data.stats import RateLimitedLog

  limited = RateLimitedLog(first_n=3)
  with caplog.at_level("WARNING", logger="nvlm_jax.data"):
    logged = [n for n in range(1, 101) if limited("corrupt_image", f"bad {n}")]
    limited("too_long", "other reason")
  assert logged == [1, 2, 3, 4, 8, 16, 32, 64]
  assert len(caplog.records) == 9 and "64 so far" in caplog.records[-2].getMessage()


def test_a_run_of_skipped_samples_raises_instead_of_spinning(processor):
  config = synthetic_config(num_samples=50, max_consecutive_skips=20)
  it = pipeline.make_train_iterator(config, processor, seq_len=8, seed=0)  # every sample is too long
  with pytest.raises(RuntimeError, match=r"20 samples in a row were skipped .*'too_long'"):
    next(it)
  it.close()
