"""Every documented command runs as written: the fenced ```bash / ```sh and ```python blocks of README.md,
docs/*.md and bench/README.md are extracted and run at tiny scale, each in its own scratch directory.

Three tables say how (extend them when a doc gains a block; a failure names the block as file:line):

* STAND_INS: a documented path (a 72B checkpoint, a dataset, a workdir) -> the tiny stand-in built here
  (`build_stand_ins`). Absolute roots (/ckpt, /data, /hf, /tmp/nvlm_*) are moved under the scratch
  directory, and every stand-in the command does not itself create (`--out`, `--config.workdir=`) is
  linked there under its documented name.
* SHORTENED: commands too long for a test, run as a short version of themselves (e.g. the README main job,
  300 steps, runs 4), with the reason.
* CANNOT_RUN: commands that cannot run here, with the reason. The test asserts the skipped set is exactly
  this table, so a new block never escapes silently: it runs, or it is listed.

Each command must exit 0 and print nothing alarming (tracebacks, leaked shared memory, RuntimeWarnings,
orbax's read-only warnings). Blocks are shell commands (one test per command, continuation lines joined) or
Python blocks (one test per block, run as a script). Anything else fenced (json, text, diagrams, output) is
not run; an unfenced block that looks like a command must be a synopsis listed in SYNOPSES.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")), "bench/README.md"]
SHELL_LANGS = {"bash", "sh", "shell"}
ABSOLUTE_ROOTS = ("/ckpt/", "/data/", "/hf/", "/tmp/nvlm_")
# Printed by a command, each is a defect (issue: quiet, honest output).
ALARMS = (
  "Traceback (most recent call last)",
  "leaked shared_memory",
  "RuntimeWarning",
  "read only",
  "read_only=True",
  "UnparsedFlagAccessError",
)
ENTRY_POINTS = ("train.py", "eval.py", "configs", "bench", "nvlm_jax", "requirements.txt", "requirements-dev.txt")

# documented path -> stand-in name (build_stand_ins). Paths are as written in the docs (absolute ones too).
STAND_INS = {
  "/ckpt/NVLM-D-72B": "nvlm_d_hf",  # NVLM-D-72B layout: tiny, padded dummy heads, tokenizer, config.json
  "/ckpt/nvlm_d_72b": "nvlm_d_ours",  # its import
  "path/to/checkpoint": "nvlm_d_hf",
  "hf/nvlm_d": "nvlm_d_hf",
  "/ckpt/Qwen2-72B-Instruct": "qwen2_hf",  # a 10-layer tiny Qwen2 with a tokenizer (10: stitch's default)
  "/ckpt/Qwen2-72B": "qwen2_hf",
  "/ckpt/Qwen2-7B": "qwen2_hf",
  "Qwen2-72B-Instruct": "qwen2_hf",
  "/ckpt/qwen2_72b": "qwen2_ours",
  "/ckpt/qwen2_7b": "qwen2_ours",
  "runs/qwen2_lm": "qwen2_ours",
  "/ckpt/InternViT-6B-448px-V1-5": "intern_vit_hf",  # the remote-code InternVisionModel layout
  "/ckpt/InternViT-6B": "intern_vit_hf",
  "InternViT-6B-448px-V1-5": "intern_vit_hf",
  "/ckpt/internvit": "intern_vit_ours",
  "/tmp/nvlm_tiny_d": "tiny_d_workdir",  # the README main job, shortened (SHORTENED)
  "runs/nvlm_d_sft": "tiny_d_workdir",
  "train.jsonl": "llava_jsonl",  # 3 LLaVA samples (one bad image) over images/
  "images": "images",
  "vqav2_val.jsonl": "vqav2_jsonl",  # 2 samples in the evaluation schema
  "results/vqav2/predictions.jsonl": "vqav2_predictions",
  "TextVQA_0.5.1_val.json": "textvqa_json",  # TextVQA's release format, with train_images/
  "train_images": "textvqa_images",
  "/data/nvlm": "tfds_nvlm",  # a tfds_builder set converted with --name synth
}

# Documented files whose contents point at others beside them (relative image paths).
BESIDE = {"vqav2_val.jsonl": ("images",), "train.jsonl": ("images",), "TextVQA_0.5.1_val.json": ("train_images",)}

# A shortened run keeps its warmup inside the run (config_base.validate refuses warmup_steps > total_steps).
SHORT_WARMUP = "--config.optimizer.warmup_steps=1"
MAIN_JOB = (
  "python train.py --config.workdir=/tmp/nvlm_tiny_d --config.total_steps=4 --config.checkpoint.every_steps=2 "
  + SHORT_WARMUP
)
RUNLOCAL_STEPS = "--config.total_steps=2 --config.checkpoint.every_steps=2 " + SHORT_WARMUP
SHORTENED = {
  "pip install -r requirements.txt && python train.py": (
    MAIN_JOB,
    "pip: the environment is installed already; the main job's 300 steps (45 s quiet) run 4",
  ),
  "python train.py": (MAIN_JOB, "300 steps (45 s quiet) run 4"),
  "python train.py --config=configs/tiny_lm.py": (
    "python train.py --config=configs/tiny_lm.py --config.workdir=/tmp/nvlm_tiny_lm --config.total_steps=4 "
    + SHORT_WARMUP,
    "200 steps run 4",
  ),
  "python train.py --config=configs/nvlm_x_72b_pretrain.py:runlocal": (
    (
      f"python train.py --config=configs/nvlm_x_72b_pretrain.py:runlocal {RUNLOCAL_STEPS} "
      "--config.workdir=/tmp/nvlm_runlocal_nvlm_x_72b_pretrain"
    ),
    "20 steps run 2",
  ),
  "python train.py --config=configs/nvlm_d_72b_sft.py:runlocal": (
    (
      f"python train.py --config=configs/nvlm_d_72b_sft.py:runlocal {RUNLOCAL_STEPS} "
      "--config.workdir=/tmp/nvlm_runlocal_nvlm_d_72b_sft"
    ),
    "20 steps run 2",
  ),
  "python -m nvlm_jax.training.plan --config=configs/nvlm_d_72b_sft.py --mesh=fsdp=64,tensor=8": (
    "python -m nvlm_jax.training.plan --config=configs/nvlm_d_72b_sft.py --mesh=fsdp=64,tensor=8 --lower_only",
    (
      "the full compile and FLOPs extrapolation take ~3 min here; --lower_only lowers the same 72B step on "
      "512 virtual devices (test_training_configs.py compiles a sharded tiny plan)"
    ),
  ),
  "python -m nvlm_jax.data.tfds_builder --synthetic 100000 --seed 0 --out /data/nvlm --name synth": (
    "python -m nvlm_jax.data.tfds_builder --synthetic 50 --seed 0 --out /data/nvlm --name synth",
    "100,000 drawn samples run 50",
  ),
  "python -m nvlm_jax.studies.learning_curve /tmp/nvlm_tiny_d --samples 500": (
    "python -m nvlm_jax.studies.learning_curve /tmp/nvlm_tiny_d --samples 2 --out learning_curve",
    "500 held-out samples per checkpoint run 2, written beside the test, not into the shared stand-in workdir",
  ),
  "python -m nvlm_jax.studies tile_tags --out studies": (
    "python -m nvlm_jax.studies tile_tags --out studies --seeds 1 --steps 2 --eval-samples 2 --arms tags_1d",
    "a 30 min study (5 arms x 3 seeds) runs one arm, one seed, 2 steps",
  ),
  "python -m nvlm_jax.studies x_frozen_llm --out studies": (
    "python -m nvlm_jax.studies x_frozen_llm --out studies --seeds 1 --steps 2 --eval-samples 2 --arms llm_frozen",
    "a 30 min study runs its text-only first stage and the frozen-LLM arm that starts from it, 2 steps each",
  ),
  "python eval.py --checkpoint /tmp/nvlm_tiny_d --benchmark synthetic": (
    "python eval.py --checkpoint /tmp/nvlm_tiny_d --benchmark synthetic --limit 10 --no-progress",
    "500 held-out samples run 10",
  ),
}
CANNOT_RUN = {
  (
    "python train.py --config=configs/nvlm_d_72b_sft.py --config.data.sources.ShareGPT.path=/data/sft/sharegpt.jsonl "
    "--config.data.sources.ChartQA.path=/data/sft/chartqa.json --config.data.sources.ChartQA.image_root=/data/chartqa"
  ): ("a 72B recipe on the SFT blend's data sets; test_recipe_fidelity.py parses these flags and opens the sources"),
  "pip install -r requirements-dev.txt && python -m pytest -q": (
    "the whole test suite, this test included (and pip would change the environment)"
  ),
  (
    "python train.py --config=configs/nvlm_d_72b_sft.py --config.workdir=/ckpt/d72_sft "
    "--config.checkpoint.init_from=/ckpt/d72_pretrain"
  ): (
    "a 72B recipe: needs the 72B pretraining checkpoint and 512 accelerators (its tiny twin is the "
    ":runlocal command; the planner lowers the same step)"
  ),
  "python bench/convert_import.py --layers 10,28 --naive": (
    "~8 min and 8 GB of disk by design (synthetic 1-3 GB checkpoints); tests/test_benchmarks.py covers the "
    "bench scripts at tiny sizes"
  ),
  "python bench/train_step_vs_torch.py": "a 1-3 min benchmark; tests/test_benchmarks.py runs it at a tiny size",
  "python bench/generate_vs_torch.py --batch 1": "a 1-2 min benchmark; tests/test_benchmarks.py runs it at a tiny size",
  "python bench/generate_vs_torch.py --batch 4": "a 1-2 min benchmark; tests/test_benchmarks.py runs it at a tiny size",
  "python bench/mfu.py": "a ~1 min benchmark; tests/test_benchmarks.py runs it at a tiny size",
  "python bench/fusion_throughput.py": "a 1-2 min benchmark; tests/test_benchmarks.py runs it at a tiny size",
  (
    "python bench/mfu.py --hidden 4096 --layers 8 --heads 32 --kv-heads 8 --intermediate 11008 --seq-len 2048 --batch 8"
  ): "sized for a GPU (a 4096-wide model at 2048 tokens)",
  "python -m nvlm_jax.studies x_tile_tags --out studies": (
    "a 30 min study; the same runner runs tile_tags shortened here, and tests/test_studies.py checks its arms"
  ),
  "python -m nvlm_jax.studies fusion --out studies": (
    "a 30 min study; the same runner runs tile_tags shortened here, and tests/test_studies.py checks its arms"
  ),
  "python -m nvlm_jax.studies text_retention --out studies": (
    "a 30 min study; x_frozen_llm runs its shared text-only first stage shortened here"
  ),
}
# Unfenced command-like text that is a synopsis with placeholders, not a command (file, start of the line).
SYNOPSES = {
  ("docs/evaluation.md", "python -m nvlm_jax.evaluation.converters BENCH --in PATH [PATH ...]"),
  ("docs/evaluation.md", "python -m nvlm_jax.evaluation.runner --benchmark NAME --predictions P.jsonl"),
  ("docs/miniature.md", "python -m nvlm_jax.studies STUDY --out DIR"),
}


# ---- extraction ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Example:
  file: str
  line: int
  kind: str  # "shell" (one command) or "python" (one block)
  text: str

  @property
  def where(self) -> str:
    return f"{self.file}:{self.line}"


def _shell_commands(file: str, first_line: int, lines: list[str]) -> list[Example]:
  out, pending, start = [], "", None
  for k, raw in enumerate(lines):
    line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
    if not line.strip() and not pending:
      continue
    if start is None:
      start = first_line + k
    if line.endswith("\\"):
      pending += line[:-1].strip() + " "
      continue
    out.append(Example(file, start, "shell", " ".join((pending + line.strip()).split())))
    pending, start = "", None
  return out


def extract_examples(file: str) -> list[Example]:
  lines = (REPO / file).read_text().split("\n")
  out, i = [], 0
  while i < len(lines):
    m = re.match(r"^```(\w*)\s*$", lines[i])
    if not m:
      i += 1
      continue
    j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
    body, lang = lines[i + 1 : j], m.group(1)
    if lang in SHELL_LANGS:
      out += _shell_commands(file, i + 2, body)
    elif lang == "python":
      out.append(Example(file, i + 2, "python", "\n".join(body) + "\n"))
    i = j + 1
  return out


def unfenced_commands(file: str) -> list[tuple[int, str]]:
  """Indented or unlabelled-fence lines that start like a command or Python import (should be fenced)."""
  found, fenced, lang = [], False, ""
  for n, line in enumerate((REPO / file).read_text().split("\n"), 1):
    if line.startswith("```"):
      fenced, lang = (not fenced), line[3:].strip()
      continue
    code = line[4:] if line.startswith("    ") and not fenced else line if fenced and not lang else None
    if code is not None and re.match(r"(python |pip |from nvlm_jax|import nvlm_jax)", code):
      found.append((n, code.strip()))
  return found


ALL_EXAMPLES = [e for f in DOC_FILES for e in extract_examples(f)]


def _key(example: Example) -> str:
  return example.text if example.kind == "shell" else f"{example.file}: {example.text.splitlines()[0]}"


RUNNABLE = [e for e in ALL_EXAMPLES if _key(e) not in CANNOT_RUN]


# Stand-ins that need the trained tiny workdir or the PyTorch reference models (seconds to tens of seconds).
HEAVY_STAND_INS = {
  "tiny_d_workdir",
  "nvlm_d_hf",
  "nvlm_d_ours",
  "qwen2_hf",
  "qwen2_ours",
  "intern_vit_hf",
  "intern_vit_ours",
}
MODEL_WORK = (
  "train.py",
  "eval.py --checkpoint",
  "training.plan",
  "convert import",
  "convert export",
  "convert verify",
  "convert stitch",
  "load_pretrained",
  "load_checkpoint",
  "load_model",
  "generate",
  "stitch_checkpoint",
  "import_checkpoint",
  "make_train_iterator",
  "nvlm_jax.studies tile_tags",
  "nvlm_jax.studies x_frozen_llm",
)


def _is_slow(example: Example) -> bool:
  """Marked slow: examples that train, compile a model, or read a stand-in that needs either."""
  text = example.text
  return any(w in text for w in MODEL_WORK) or any(p in text for p, n in STAND_INS.items() if n in HEAVY_STAND_INS)


# ---- stand-ins -------------------------------------------------------------------------------------------
def subprocess_env(cache_dir: Path) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # one CPU device (not conftest's 8), fast compiles
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env["TOKENIZERS_PARALLELISM"] = "false"
  return env


def _png(path: Path, seed: int, size=(120, 200)) -> Path:
  from PIL import Image

  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
  return path


def _write_jsonl(path: Path, rows) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


class StandIns:
  """The tiny stand-ins, each built on first use (a quick run builds only what its examples read)."""

  def __init__(self, root: Path, env: dict):
    self.root, self.env, self._built = root, env, {}

  def __getitem__(self, name: str) -> Path:
    if name not in self._built:
      self._built[name] = getattr(self, f"_{name}")()
    return self._built[name]

  def _main_job(self) -> str:  # the README main job (shortened): the workdir most examples start from
    cwd = scratch_dir(self.root / "main_job")
    output = run_shell(MAIN_JOB, cwd, self.env)
    self._built["tiny_d_workdir"] = cwd / "tmp" / "nvlm_tiny_d"
    return output

  def _tiny_d_workdir(self) -> Path:
    self["main_job"]
    return self._built["tiny_d_workdir"]

  def _convert(self, *args) -> None:
    from nvlm_jax import convert

    assert convert.main([str(a) for a in args] + ["--quiet"]) == 0, args

  def _nvlm_d_hf(self) -> Path:
    out = self.root / "nvlm_d_hf"
    self._convert(
      "export", "--checkpoint", self["tiny_d_workdir"], "--out", out, "--layout", "nvlm_d", "--pad-dummy-heads"
    )
    return out

  def _qwen2_hf(self) -> Path:
    import reference_models as rm

    from nvlm_jax.processing.tokenizer import build_tiny_tokenizer

    out = rm.save(rm.build_causal_lm(rm.tiny_qwen2_config(num_hidden_layers=10), seed=0), self.root / "qwen2_hf")
    build_tiny_tokenizer(vocab_size=rm.TINY_TEXT["vocab_size"]).save_pretrained(out)
    return out

  def _intern_vit_hf(self) -> Path:
    """The tiny workdir's ViT in the remote-code InternVisionModel layout (InternViT-6B-448px-V1-5's)."""
    from nvlm_jax.checkpoint.convert import configs as convert_configs
    from nvlm_jax.checkpoint import safetensors_io
    from nvlm_jax.checkpoint.vision_layouts import intern_vit_rules
    from nvlm_jax.models import load_checkpoint

    model, params = load_checkpoint(self["tiny_d_workdir"])
    vision, out = model.config.vision, self.root / "intern_vit_hf"
    out.mkdir()
    tensors = intern_vit_rules(vision, name="InternVisionModel").to_hf(params["vision_model"])
    safetensors_io.save_sharded(tensors, out, max_shard_bytes=200_000)
    (out / "config.json").write_text(json.dumps(convert_configs.intern_vit_config_json(vision, "float32")))
    return out

  def _imported(self, source: str, *extra) -> Path:
    out = self.root / f"{source}_imported"
    self._convert("import", "--hf-dir", self[source], "--out", out, *extra)
    return out

  def _nvlm_d_ours(self) -> Path:
    return self._imported("nvlm_d_hf")

  def _qwen2_ours(self) -> Path:
    return self._imported("qwen2_hf")

  def _intern_vit_ours(self) -> Path:
    return self._imported("intern_vit_hf", "--layout", "intern_vit")

  def _images(self) -> Path:
    out = self.root / "data" / "images"
    _png(out / "a.png", 0)
    _png(out / "b.png", 1, (300, 180))
    (out / "broken.png").write_bytes(b"not an image")
    return out

  def _llava_jsonl(self) -> Path:
    self["images"]
    return _write_jsonl(
      self.root / "data" / "train.jsonl",
      [
        {
          "id": "1",
          "image": "a.png",
          "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise."}],
        },
        {
          "id": "2",
          "image": "broken.png",
          "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Nothing."}],
        },
        {"id": "3", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
      ],
    )

  def _vqav2_jsonl(self) -> Path:
    self["images"]
    return _write_jsonl(
      self.root / "data" / "vqav2_val.jsonl",
      [
        {"id": "q1", "images": ["images/a.png"], "question": "What color is it?", "answers": ["red"] * 10},
        {"id": "q2", "images": ["images/b.png"], "question": "How many?", "answers": ["2"] * 10},
      ],
    )

  def _vqav2_predictions(self) -> Path:
    return _write_jsonl(
      self.root / "data" / "predictions.jsonl", [{"id": "q1", "prediction": "Red"}, {"id": "q2", "prediction": "three"}]
    )

  def _textvqa_images(self) -> Path:
    return _png(self.root / "data" / "train_images" / "img1.jpg", 2).parent

  def _textvqa_json(self) -> Path:
    self["textvqa_images"]
    out = self.root / "data" / "TextVQA_0.5.1_val.json"
    out.write_text(
      json.dumps(
        {
          "dataset_type": "val",
          "data": [
            {"question_id": 7, "image_id": "img1", "question": "What does the sign say?", "answers": ["stop"] * 10}
          ],
        }
      )
    )
    return out

  def _tfds_nvlm(self) -> Path:
    from nvlm_jax.data import tfds_builder
    from nvlm_jax.data.synthetic import SyntheticSource

    out = self.root / "data" / "nvlm"
    tfds_builder.convert([SyntheticSource(8, 0)], out, name="synth")
    return out


def scratch_dir(path: Path) -> Path:
  """A working directory with the repository's entry points (train.py, configs/, ...) linked in."""
  path.mkdir(parents=True)
  for name in ENTRY_POINTS:
    (path / name).symlink_to(REPO / name)
  return path


def localize(text: str, cwd: Path) -> str:
  """Moves the documented absolute roots under `cwd` (so outputs land in the scratch directory)."""
  for root in ABSOLUTE_ROOTS:
    text = text.replace(root, f"{cwd}/{root.lstrip('/')}")
  return text


def outputs_of(text: str) -> set[str]:
  """Documented paths the command (or block) creates itself: no stand-in may sit there."""
  found = set(re.findall(r"--out[ =](\S+)|--config\.workdir=(\S+)", text))
  found = {a or b for a, b in found}
  found |= set(re.findall(r"_checkpoint\(\"[^\"]+\", \"([^\"]+)\"", text))  # import/export_checkpoint(src, out)
  return {p.rstrip("/") for p in found}


def link_stand_ins(cwd: Path, text: str, stand_ins: StandIns) -> None:
  """Links the stand-in of every documented path the example mentions, except where it writes itself."""
  created = outputs_of(text)
  mentioned = {p for p in STAND_INS if p in text}
  mentioned |= {b for p in mentioned for b in BESIDE.get(p, ())}
  for documented, name in STAND_INS.items():
    if documented not in mentioned or any(documented == c or documented.startswith(c + "/") for c in created):
      continue
    target = cwd / localize(documented, Path(".")).lstrip("./")
    if not target.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      target.symlink_to(stand_ins[name])


def run_shell(command: str, cwd: Path, env: dict) -> str:
  """Runs one command in `cwd`; returns its output. Raises AssertionError on failure or alarms."""
  proc = subprocess.run(
    localize(command, cwd),
    check=False,
    shell=True,
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    executable="/bin/bash",
  )
  output = proc.stdout + proc.stderr
  if proc.returncode != 0:
    raise AssertionError(f"exited {proc.returncode}\n{output[-4000:]}")
  alarms = [a for a in ALARMS if a in output]
  if alarms:
    raise AssertionError(f"printed {alarms}\n{output[-4000:]}")
  return output


# ---- fixtures --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DocsRun:
  root: Path
  env: dict
  stand_ins: StandIns
  results: dict  # effective command -> output (a command documented twice runs once)
  count: int = 0


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("docs")
  env = subprocess_env(root / "jax_cache")
  return DocsRun(root, env, StandIns(root / "stand_ins", env), {})


def effective_text(example: Example) -> str:
  return SHORTENED.get(example.text, (example.text, ""))[0] if example.kind == "shell" else example.text


def run_example(example: Example, run: DocsRun) -> str:
  text = effective_text(example)
  try:
    if text == MAIN_JOB:  # the stand-in of /tmp/nvlm_tiny_d is this run
      return run.stand_ins["main_job"]
    if text not in run.results:
      run.count += 1
      cwd = scratch_dir(run.root / f"example{run.count}")
      link_stand_ins(cwd, text, run.stand_ins)
      command = text
      if example.kind == "python":
        (cwd / "example.py").write_text(localize(text, cwd))
        command = f"{shlex.quote(sys.executable)} example.py"
      run.results[text] = run_shell(command, cwd, run.env)
    return run.results[text]
  except AssertionError as e:
    shown = example.text if text == example.text else f"{example.text}\n  (ran: {text})"
    raise AssertionError(f"{example.where}: the documented {example.kind} example failed:\n  {shown}\n{e}") from None


def _param(example: Example):
  return pytest.param(example, id=example.where, marks=[pytest.mark.slow] if _is_slow(example) else [])


# ---- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("example", [_param(e) for e in RUNNABLE])
def test_documented_example_runs_as_written(example, docs_run):
  output = run_example(example, docs_run)
  if "python train.py" in example.text:  # says which recipe runs where (a :runlocal workdir is named after it)
    assert re.search(r"^recipe \S+, workdir /\S+", output, re.MULTILINE), output[-2000:]
  if "convert export" in example.text and "--layout nvlm_d" in example.text:  # a directory that stands alone
    summary = json.loads(output[output.index("{") : output.rindex("}") + 1])
    assert "tokenizer.json" in summary["side_files"] and summary["processor_settings"], summary


def test_every_block_runs_or_is_listed_with_a_reason():
  """CANNOT_RUN and SHORTENED name only commands the docs hold (a stale entry fails), so the skipped set is
  exactly CANNOT_RUN; command-like text outside a runnable fence must be a listed synopsis."""
  keys = {_key(e) for e in ALL_EXAMPLES}
  assert not set(CANNOT_RUN) - keys, f"CANNOT_RUN lists commands no doc has: {sorted(set(CANNOT_RUN) - keys)}"
  assert not set(SHORTENED) - keys, f"SHORTENED lists commands no doc has: {sorted(set(SHORTENED) - keys)}"
  stray = [
    f"{f}:{n}: {text}"
    for f in DOC_FILES
    for n, text in unfenced_commands(f)
    if not any(f == file and text.startswith(start) for file, start in SYNOPSES)
  ]
  assert not stray, "commands outside a ```bash / ```python fence (fence them, or list a synopsis):\n" + "\n".join(
    stray
  )


def test_the_repository_refers_to_nothing_outside_it():
  """No reference to files outside the repository, and every citation of the paper's facts points at
  docs/paper.md (the old "spec (x)" notes lived outside the repository)."""
  bad = []
  patterns = (r"\.\./shared|nvlm_spec|ENGINEERING\.md", r"\bspec \(?[a-j](\.\d)?\)?(?=[\s,;.)/])", r"\bspec UNVERIFIED")
  for path in sorted(REPO.rglob("*")):
    hidden = any(part.startswith(".") for part in path.relative_to(REPO).parts)  # .git, virtualenvs, scratch
    if path.suffix not in (".py", ".md") or hidden or path.name == "test_docs.py":
      continue
    for n, line in enumerate(path.read_text().split("\n"), 1):
      if any(re.search(p, line) for p in patterns):
        bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
  assert not bad, "\n".join(bad)


def test_dotted_names_in_the_docs_resolve_after_import_nvlm_jax():
  """`nvlm_jax.fusion.NVLMD`, `nvlm_jax.Processor.from_pretrained`, ...: as written, after `import nvlm_jax`."""
  import nvlm_jax

  missing = []
  for file in DOC_FILES:
    for n, line in enumerate((REPO / file).read_text().split("\n"), 1):
      for name in re.findall(r"(?<![\w/])nvlm_jax(?:\.[A-Za-z_]\w*)+", line):
        value = nvlm_jax
        try:
          for part in name.split(".")[1:]:
            value = getattr(value, part)
        except AttributeError:
          missing.append(f"{file}:{n}: {name}")
  assert not missing, "\n".join(missing)


@pytest.mark.parametrize("module", ["nvlm_jax.evaluation.runner", "nvlm_jax.evaluation.converters", "nvlm_jax.studies"])
def test_module_clis_start_without_warnings(module, tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", module, "--help"],
    capture_output=True,
    text=True,
    check=False,
    cwd=tmp_path,
    env=subprocess_env(tmp_path / "cache"),
  )
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
