"""The paper's SFT data blend (arXiv 2409.11402, section 5.2 and Table 6), as data sources to fill in.

Every SFT recipe (configs/nvlm_*_sft.py) uses it as `data.sources`: one named source per data set, each with
an empty `path` (a LLaVA-format .json / .jsonl file; set `kind="array_record"` for a tfds_builder output)
and a `weight`. Fill the paths on the command line, e.g.

    python train.py --config=configs/nvlm_d_72b_sft.py \\
        --config.data.sources.ShareGPT.path=/data/sft/sharegpt.jsonl \\
        --config.data.sources.ChartQA.path=/data/sft/chartqa.json --config.data.sources.ChartQA.image_root=/data/img

A source whose path is still empty is an error naming it when the pipeline starts; drop a source you do not
have with its weight: `--config.data.sources.ScreenQA.weight=0` (a zero weight is never opened).

Weights: the paper gives none (neither does the authors' Megatron `sft_blend.yaml`, whose weights are
placeholders), so every source starts at 1.0: equal probability per source, whatever its size. That is a
choice of ours, not the paper's; set them to taste.

Sources: the text-only SFT sets are the paper's list (section 5.2: general ShareGPT, SlimOrca,
EvolInstruct, GPTeacher, AlpacaGPT4, UltraInteract; math OrcaMath, MathInstruct, MetaMath; code GlaiveCode,
Magicoder, WizardCoder; the authors refined their responses with GPT-4o / GPT-4o-mini, which these sources
do not redo). The multimodal sets follow Table 6 by task; docs/data.md says which names were checked here.
"""

import ml_collections

# Table 6, multimodal SFT, by task (names usable as config keys: ShareGPT-4o -> ShareGPT4o, GeoQA+ -> GeoQAPlus).
MULTIMODAL_SFT = {
  "captioning": ("TextCaps", "ShareGPT4o"),
  "natural_image_vqa": ("VQAv2", "GQA", "OKVQA", "VisualGenome", "VizWiz"),
  "chart_diagram_table": ("ChartQA", "DVQA", "PlotQA", "FigureQA", "MapQA"),
  "document": ("DocVQA", "DocReason25K"),
  "ocr_scene_text": ("OCRVQA", "TextVQA", "STVQA", "ScreenQA", "VisualMRC", "InfographicVQA"),
  "math": ("GeoQAPlus", "Geometry3K", "MAVIS", "Geo170K", "CLEVRMath", "TabMWP"),
  "science": ("AI2D", "ScienceQA", "TQA"),
}
# Section 5.2, text-only SFT.
TEXT_ONLY_SFT = {
  "general": ("ShareGPT", "SlimOrca", "EvolInstruct", "GPTeacher", "AlpacaGPT4", "UltraInteract"),
  "math": ("OrcaMath", "MathInstruct", "MetaMath"),
  "code": ("GlaiveCode", "Magicoder", "WizardCoder"),
}


def source_names() -> tuple[str, ...]:
  groups = list(MULTIMODAL_SFT.values()) + list(TEXT_ONLY_SFT.values())
  return tuple(name for group in groups for name in group)


def get_config(arg=None):
  """ConfigDict {name: {"kind", "path", "weight"}} (the pipeline accepts sources keyed by name)."""
  del arg
  sources = ml_collections.ConfigDict()
  for name in source_names():
    spec = {"kind": "llava", "path": "", "weight": 1.0}
    if name in sum(MULTIMODAL_SFT.values(), ()):
      spec["image_root"] = ""  # "": the directory of `path` (a string, so the command line can set it)
    sources[name] = spec
  return ml_collections.ConfigDict({"sources": sources})
