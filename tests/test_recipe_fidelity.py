"""The paper recipes do what the paper did: NVLM-X trains its projector, the 34B recipes use Yi-34B's
prompt settings, single-tile pretraining has no tile tags, and every SFT recipe reads the paper's SFT
blend (configs/sft_blend.py), refusing a source whose path was not filled in."""

import subprocess
import sys
from pathlib import Path

import pytest
from test_training_configs import RECIPES, load

from nvlm_jax.data import pipeline
from nvlm_jax.processing.tile_tags import YI_GLOBAL_TILE_TAG
from nvlm_jax.data import processor_setup

SFT_RECIPES = [r for r in RECIPES if r.endswith("_sft")]
TEXT_ONLY_SFT = (
  "ShareGPT",
  "SlimOrca",
  "EvolInstruct",
  "GPTeacher",
  "AlpacaGPT4",
  "UltraInteract",
  "OrcaMath",
  "MathInstruct",
  "MetaMath",
  "GlaiveCode",
  "Magicoder",
  "WizardCoder",
)
TABLE_6_CHECKED = ("ChartQA", "DocVQA", "VQAv2", "TextVQA", "AI2D", "GeoQAPlus", "Geometry3K", "MAVIS", "Geo170K")


@pytest.mark.parametrize("name", [r for r in RECIPES if r.startswith("nvlm_x_")])
def test_nvlm_x_trains_its_projector(name):
  assert "projector" in load(name).trainable and "projector" in load(name, "runlocal").trainable


@pytest.mark.parametrize("name", RECIPES)
def test_prompt_format_and_thumbnail_tag_follow_the_backbone(name):
  processor = load(name).data.processor
  if "_34b_" in name:
    assert (processor.chat_format, processor.global_tile_tag) == ("nvlm-yi-34b", YI_GLOBAL_TILE_TAG)
  else:
    assert processor.get("chat_format", "chatml") == "chatml" and "global_tile_tag" not in processor


@pytest.mark.parametrize("name", [r for r in RECIPES if r.endswith("_pretrain")])
def test_single_tile_pretraining_has_no_tile_tags(name):
  c = load(name)
  if name.startswith("nvlm_h_"):  # H pretrains with 6 + 1 tiles, which need their tags
    assert (c.data.max_tiles, c.data.processor.tile_tag_format, c.data.processor.use_tiling) == (7, "1d", True)
  else:
    assert (c.data.max_tiles, c.data.processor.tile_tag_format, c.data.processor.use_tiling) == (1, "none", False)


@pytest.mark.parametrize("name", SFT_RECIPES)
def test_sft_recipes_read_the_paper_blend(name):
  sources = load(name).data.sources
  assert set(TEXT_ONLY_SFT) | set(TABLE_6_CHECKED) <= set(sources)
  assert all(spec.path == "" and spec.weight > 0 for spec in sources.values())
  with pytest.raises(ValueError, match=r"data source '\w+' \(llava\): 'path' is empty"):
    pipeline.make_blend(load(name).data)


def test_a_missing_path_names_its_source_and_zero_weights_are_left_out(tmp_path):
  data = load("nvlm_d_72b_sft").data
  for source in data.sources:
    data.sources[source].weight = 0.0
  data.sources.ShareGPT.weight = 1.0
  with pytest.raises(ValueError, match=r"data source 'ShareGPT' \(llava\): 'path' is empty; fill it in"):
    pipeline.make_blend(data)
  sharegpt = tmp_path / "sharegpt.jsonl"
  sharegpt.write_text(
    '{"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ok"}]}\n'
  )
  data.sources.ShareGPT.path = str(sharegpt)
  blend = pipeline.make_blend(data)
  assert blend.names == ["ShareGPT"] and len(blend) == 1


@pytest.mark.parametrize("name", ["nvlm_d_34b_sft", "nvlm_x_72b_sft"])
def test_runlocal_sft_builds_its_processor_on_the_synthetic_data(name):
  """The runlocal variant swaps the blend for the synthetic set; a Yi-format recipe gets a BOS for the tiny
  tokenizer, so its prompts start with one."""
  from nvlm_jax import models

  c = load(name, "runlocal")
  assert [s["kind"] for s in c.data.sources] == ["synthetic"]
  processor, _ = processor_setup.build_processor(c.data, models.model_config_from_settings(c.model))
  record = pipeline.make_blend(c.data, processor)[0]
  assert record is not None
  if "_34b_" in name:
    assert processor.chat_format == "nvlm-yi-34b" and processor.tokenizer.bos_id is not None
    batch = processor([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}], [])
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_id


def test_blend_paths_and_image_roots_are_set_on_the_command_line(tmp_path):
  """docs/data.md's command: a source's path and image_root are overridden by flag, and the blend opens them
  ("" keeps the default: images beside the file)."""
  chartqa = tmp_path / "chartqa.json"
  chartqa.write_text(
    '[{"id": "c", "image": "c.png", "conversations": [{"from": "human", "value": "<image>\\nQ?"}, '
    '{"from": "gpt", "value": "A"}]}]'
  )
  show = (
    "from absl import app; from ml_collections import config_flags; c = config_flags.DEFINE_config_file('config'); "
    "app.run(lambda _: print(c.value.data.sources.ChartQA.path, c.value.data.sources.ChartQA.image_root))"
  )
  recipe = Path(__file__).resolve().parent.parent / "configs" / "nvlm_d_72b_sft.py"
  args = [
    f"--config={recipe}",
    f"--config.data.sources.ChartQA.path={chartqa}",
    "--config.data.sources.ChartQA.image_root=/data/chartqa",
  ]
  shown = subprocess.run([sys.executable, "-c", show, *args], capture_output=True, text=True, timeout=120)
  assert shown.stdout.split() == [str(chartqa), "/data/chartqa"], shown.stderr[-2000:]

  data = load("nvlm_d_72b_sft").data
  for name in data.sources:
    data.sources[name].weight = 1.0 if name == "ChartQA" else 0.0
  data.sources.ChartQA.path = str(chartqa)
  (beside,) = pipeline.make_blend(data).sources
  data.sources.ChartQA.image_root = "/data/chartqa"
  (rooted,) = pipeline.make_blend(data).sources
  assert (beside.image_root, rooted.image_root) == (tmp_path, Path("/data/chartqa"))
