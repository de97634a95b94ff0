"""The built-in synthetic dataset: deterministic, file-free records whose answers need high-resolution tiles.

Every sample depends only on ``(seed, index)``, so any index can be generated in any process, in any order.
An image sample is one drawn *scene* (a canvas of varied size and aspect ratio holding coloured shapes, a
small white box with a few digits in small print, and sometimes a word in large letters) plus 1-3 questions
about it; a text-only sample is 1-3 arithmetic / word questions. Answers are short and exactly determined
by the scene:

* ``What is the number written in the small box?`` -> ``"407"``. The digits are ``small_text_px`` tall in
  *tile* pixels (the scale the model sees in the DHR tiles); in the thumbnail they are ``cols`` times smaller.
* ``Which tile holds the red circle?`` -> ``"tile 3"``. Tiles are the DHR grid of docs/paper.md (b) for this image
  (``tiling.select_grid`` with ``tile_size``/``max_tiles``), numbered row-major from 1, i.e. exactly the
  ``<tile_k>`` tag the model sees before that tile. Only asked when the grid has >= 2 tiles, and the scene
  holds exactly one red circle, drawn wholly inside one tile. (Meaningless without tiling, e.g. pretraining.)
* ``How many triangles are there?`` -> ``"2"`` (may be ``"0"``).
* ``What color is the square?`` -> ``"blue"`` (only asked for a shape kind that occurs exactly once).
* ``What word is written in large letters?`` -> ``"river"``.

Every question has a *type* (``QUESTION_TYPES``; ``SamplePlan.types``), the unit the synthetic benchmark
(nvlm_jax/evaluation/synthetic.py) reports accuracy in: ``digits`` (the small-print number: needs the
high-resolution tiles), ``tile`` (needs the tile tags), ``count``, ``colour``, ``word`` (visible in the
thumbnail too) and ``text_only`` (the arithmetic / word questions of text-only samples).

Layout: each DHR tile is split into 2x2 cells and every object lives inside one cell (the word in the two
cells of a half tile), so objects never overlap and never straddle a tile border. Drawing is PIL without
antialiasing, so shape interiors hold their exact palette colour; images are PNG-encoded (lossless).

Size presets (``size=``): ``"tiny"`` draws 56-224 px images for tiles of 56 px (fast demo, ~1-2 ms a sample);
``"paper"`` draws 448-1344 px images for 448 px tiles (NVLM's 6+1 tiles). Any preset field can be overridden.
The vocabulary is deliberately small; ``corpus_texts(n)`` returns text to train the demo's tiny tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nvlm_jax.data.records import IMAGE_MARK, Record
from nvlm_jax.vision.tiling import select_grid

SIZE_PRESETS = {
  "tiny": {"image_size_range": (56, 224), "tile_size": 56},
  "paper": {"image_size_range": (448, 1344), "tile_size": 448},
}
COLORS = {  # name -> exact RGB drawn; all saturated, so never confused with the light backgrounds
  "red": (220, 30, 30),
  "green": (30, 160, 60),
  "blue": (40, 70, 210),
  "yellow": (235, 200, 20),
  "purple": (140, 50, 170),
  "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
WORDS = (
  "apple",
  "river",
  "stone",
  "cloud",
  "tiger",
  "house",
  "green",
  "light",
  "music",
  "paper",
  "smile",
  "bread",
  "chair",
  "ocean",
  "plant",
  "zebra",
)
SYSTEM_PROMPT = "Answer the questions."
TEXT_COLOR = (20, 20, 20)
BOX_FILL = (255, 255, 255)

Q_NUMBER = "What is the number written in the small box?"
Q_TILE = "Which tile holds the red circle?"
Q_COUNT = "How many {plural} are there?"
Q_COLOR = "What color is the {shape}?"
Q_WORD = "What word is written in large letters?"
Q_ADD = "What is {a} + {b}?"
Q_SUB = "What is {a} - {b}?"
Q_MUL = "What is {a} times {b}?"
Q_REPEAT = "Repeat the word {w}."
Q_REVERSE = "Spell the word {w} backwards."
Q_LENGTH = "How many letters are in the word {w}?"

# Question types: what a question needs from the image (see the module docstring).
DIGITS, TILE, COUNT, COLOUR, WORD, TEXT_ONLY = "digits", "tile", "count", "colour", "word", "text_only"
QUESTION_TYPES = (DIGITS, TILE, COUNT, COLOUR, WORD, TEXT_ONLY)

_MIN_FONT_PX = 6
_CELLS_PER_TILE_SIDE = 2


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  box: tuple[int, int, int, int]  # (x0, y0, x1, y1) inclusive drawing box in image pixels
  tile: int  # 0-based row-major DHR tile holding the shape

  @property
  def center(self) -> tuple[int, int]:
    x0, y0, x1, y1 = self.box
    return (x0 + x1) // 2, (y0 + y1) // 2


@dataclasses.dataclass(frozen=True)
class TextItem:
  text: str
  font_px: int
  origin: tuple[int, int]  # where PIL draws the text (ImageDraw.text xy, anchor "la")
  box: tuple[int, int, int, int] | None  # the white outlined box behind it (digits) or None (word)


@dataclasses.dataclass(frozen=True)
class Scene:
  width: int
  height: int
  grid: tuple[int, int]  # (cols, rows) of the DHR tiling of this image
  background: tuple[int, int, int]
  shapes: tuple[Shape, ...]
  number: TextItem | None
  word: TextItem | None


@dataclasses.dataclass(frozen=True)
class SamplePlan:
  """Everything about sample i except pixels; ``__getitem__`` renders it, tests check answers against it."""

  id: str
  scene: Scene | None  # None: text-only
  qa: tuple[tuple[str, str], ...]
  system: bool
  types: tuple[str, ...]  # the QUESTION_TYPES entry of each qa pair


@functools.lru_cache(maxsize=256)
def font(px: int) -> ImageFont.FreeTypeFont:
  """PIL's built-in scalable font (no font files needed) at ``px`` pixels."""
  return ImageFont.load_default(size=px)


class SyntheticSource:
  """Random-access synthetic records; ``source[i]`` depends only on ``(seed, i)``."""

  def __init__(
    self,
    num_samples: int,
    seed: int = 0,
    *,
    size: str = "tiny",
    image_size_range: tuple[int, int] | None = None,
    tile_size: int | None = None,
    max_tiles: int = 6,
    text_only_fraction: float = 0.2,
    small_text_px: int | None = None,
    max_questions: int = 3,
    system_fraction: float = 0.3,
    red_circle_fraction: float = 0.6,
    name: str = "synthetic",
  ):
    if size not in SIZE_PRESETS:
      raise ValueError(f"unknown size preset {size!r}; expected one of {sorted(SIZE_PRESETS)}")
    preset = SIZE_PRESETS[size]
    self.num_samples = int(num_samples)
    self.seed = int(seed)
    self.size = size
    self.image_size_range = tuple(image_size_range or preset["image_size_range"])
    self.tile_size = int(tile_size or preset["tile_size"])
    self.max_tiles = int(max_tiles)
    self.text_only_fraction = float(text_only_fraction)
    # digit height in tile pixels: ~10 px at 56 px tiles, capped at 16 px (small print) for 448 px tiles
    self.small_text_px = int(small_text_px or min(16, max(_MIN_FONT_PX, round(0.18 * self.tile_size))))
    self.max_questions = int(max_questions)
    self.system_fraction = float(system_fraction)
    self.red_circle_fraction = float(red_circle_fraction)
    self.name = name
    lo, hi = self.image_size_range
    if self.num_samples < 0 or not 0 < lo <= hi or not 0.0 <= text_only_fraction <= 1.0 or max_questions < 1:
      raise ValueError(
        f"bad SyntheticSource arguments: num_samples={num_samples}, image_size_range="
        f"{self.image_size_range}, text_only_fraction={text_only_fraction}, "
        f"max_questions={max_questions}"
      )

  def __len__(self) -> int:
    return self.num_samples

  def __repr__(self) -> str:
    return (
      f"SyntheticSource({self.num_samples}, seed={self.seed}, size={self.size!r}, "
      f"image_size_range={self.image_size_range}, tile_size={self.tile_size})"
    )

  def __getitem__(self, index: int) -> Record:
    plan = self.plan(index)
    images = [] if plan.scene is None else [encode_png(render(plan.scene))]
    return {"id": plan.id, "source": self.name, "messages": plan_messages(plan), "images": images}

  def _index(self, index: int) -> int:
    index = int(index)
    if index < 0:
      index += self.num_samples
    if not 0 <= index < self.num_samples:
      raise IndexError(f"index {index} out of range for {self!r}")
    return index

  # ---- planning (cheap, no pixels) ----------------------------------------------------------------
  def plan(self, index: int) -> SamplePlan:
    index = self._index(index)
    rng = np.random.default_rng([self.seed, index])
    sample_id = f"{self.name}:{self.seed}:{index}"
    system = bool(rng.random() < self.system_fraction)
    n_questions = int(rng.integers(1, self.max_questions + 1))
    if rng.random() < self.text_only_fraction:
      scene, questions = None, _text_questions(rng, n_questions)
    else:
      scene = self._plan_scene(rng)
      typed = _scene_questions(scene, count_kind=SHAPES[int(rng.integers(len(SHAPES)))])
      order = rng.permutation(len(typed))[:n_questions]
      questions = tuple(typed[k] for k in sorted(order))
    qa = tuple((question, answer) for question, answer, _ in questions)
    return SamplePlan(sample_id, scene, qa, system, tuple(kind for _, _, kind in questions))

  def _plan_scene(self, rng: np.random.Generator) -> Scene:
    lo, hi = self.image_size_range
    width, height = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    cols, rows = select_grid(width, height, max_tiles=self.max_tiles, image_size=self.tile_size)
    ncx, ncy = cols * _CELLS_PER_TILE_SIDE, rows * _CELLS_PER_TILE_SIDE
    xs = [c * width // ncx for c in range(ncx + 1)]
    ys = [r * height // ncy for r in range(ncy + 1)]

    def cell_box(cx, cy):
      return xs[cx], ys[cy], xs[cx + 1], ys[cy + 1]

    def cell_tile(cx, cy):
      return (cy // _CELLS_PER_TILE_SIDE) * cols + cx // _CELLS_PER_TILE_SIDE

    free = {(cx, cy) for cx in range(ncx) for cy in range(ncy)}
    background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    # pixels of the original image per tile pixel (the tiles see the image stretched by 1/scale)
    scale = min(width / (cols * self.tile_size), height / (rows * self.tile_size))

    word = None
    if rng.random() < 0.4:  # a word across the top or bottom half of one tile (2 cells)
      tx, ty, half = int(rng.integers(cols)), int(rng.integers(rows)), int(rng.integers(2))
      cx, cy = tx * 2, ty * 2 + half
      x0, y0, _, y1 = cell_box(cx, cy)
      x1 = cell_box(cx + 1, cy)[2]
      word = _fit_text(
        rng, WORDS[int(rng.integers(len(WORDS)))], (x0, y0, x1, y1), max_px=int(0.7 * (y1 - y0)), boxed=False
      )
      if word is not None:
        free -= {(cx, cy), (cx + 1, cy)}

    number = None
    if rng.random() < 0.85 and free:
      cell = _pick(rng, free)
      font_px = max(_MIN_FONT_PX, round(self.small_text_px * scale))
      for n_digits in range(int(rng.integers(2, 5)), 0, -1):
        low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
        digits = str(int(rng.integers(low, 10**n_digits)))
        number = _fit_text(rng, digits, cell_box(*cell), max_px=font_px, boxed=True)
        if number is not None:
          free.discard(cell)
          break

    shapes = []
    n_shapes = min(len(free), int(rng.integers(2, 9)))
    want_red_circle = cols * rows > 1 and rng.random() < self.red_circle_fraction
    has_red_circle = False
    for k in range(n_shapes):
      cell = _pick(rng, free)
      free.discard(cell)
      kind = SHAPES[int(rng.integers(len(SHAPES)))]
      color = list(COLORS)[int(rng.integers(len(COLORS)))]
      if k == 0 and want_red_circle:
        kind, color = "circle", "red"
      if (kind, color) == ("circle", "red"):
        if has_red_circle:  # keep the red circle unique, so the tile question has one answer
          color = "orange"
        has_red_circle = True
      box = _shape_box(rng, cell_box(*cell))
      if box is not None:
        shapes.append(Shape(kind, color, box, cell_tile(*cell)))
    return Scene(width, height, (cols, rows), background, tuple(shapes), number, word)


def _pick(rng: np.random.Generator, cells: set) -> tuple[int, int]:
  ordered = sorted(cells)
  return ordered[int(rng.integers(len(ordered)))]


def _shape_box(rng, cell) -> tuple[int, int, int, int] | None:
  x0, y0, x1, y1 = cell
  side_max = min(x1 - x0, y1 - y0) - 4  # >= 2 px clear of the cell (and tile) border on each side
  if side_max < 6:
    return None
  side = max(6, int(side_max * rng.uniform(0.55, 1.0)))
  ox = x0 + 2 + int(rng.integers(0, x1 - x0 - 4 - side + 1))
  oy = y0 + 2 + int(rng.integers(0, y1 - y0 - 4 - side + 1))
  return ox, oy, ox + side - 1, oy + side - 1


def _fit_text(rng, text: str, cell, *, max_px: int, boxed: bool) -> TextItem | None:
  """Largest font <= max_px whose text (plus box padding) fits the cell, at a random spot; else None."""
  x0, y0, x1, y1 = cell
  for px in range(max_px, _MIN_FONT_PX - 1, -1):
    left, top, right, bottom = font(px).getbbox(text)
    pad = max(2, px // 4) if boxed else 0
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    if w <= x1 - x0 - 4 and h <= y1 - y0 - 4:
      bx = x0 + 2 + int(rng.integers(0, x1 - x0 - 4 - w + 1))
      by = y0 + 2 + int(rng.integers(0, y1 - y0 - 4 - h + 1))
      origin = (bx + pad - left, by + pad - top)
      box = (bx, by, bx + w - 1, by + h - 1) if boxed else None
      return TextItem(text, px, origin, box)
    if not boxed:
      continue
    break  # digits keep their small size: the caller tries fewer digits instead of a smaller font
  return None


def _scene_questions(scene: Scene, *, count_kind: str) -> list[tuple[str, str, str]]:
  """(question, answer, question type) of every question the scene can answer."""
  questions = []
  if scene.number is not None:
    questions.append((Q_NUMBER, scene.number.text, DIGITS))
  red_circles = [s for s in scene.shapes if (s.kind, s.color) == ("circle", "red")]
  cols, rows = scene.grid
  if len(red_circles) == 1 and cols * rows > 1:
    questions.append((Q_TILE, f"tile {red_circles[0].tile + 1}", TILE))
  counts = {kind: sum(s.kind == kind for s in scene.shapes) for kind in SHAPES}
  for kind in SHAPES:
    if counts[kind] == 1:
      color = next(s.color for s in scene.shapes if s.kind == kind)
      questions.append((Q_COLOR.format(shape=kind), color, COLOUR))
  questions.append((Q_COUNT.format(plural=SHAPE_PLURALS[count_kind]), str(counts[count_kind]), COUNT))
  if scene.word is not None:
    questions.append((Q_WORD, scene.word.text, WORD))
  return questions


def _text_questions(rng: np.random.Generator, n: int) -> tuple[tuple[str, str, str], ...]:
  """(question, answer, TEXT_ONLY) for n arithmetic / word questions."""
  qa = []
  for _ in range(n):
    task = int(rng.integers(6))
    a, b = (int(v) for v in rng.integers(0, 100, size=2))
    w = WORDS[int(rng.integers(len(WORDS)))]
    if task == 0:
      qa.append((Q_ADD.format(a=a, b=b), str(a + b)))
    elif task == 1:
      a, b = max(a, b), min(a, b)
      qa.append((Q_SUB.format(a=a, b=b), str(a - b)))
    elif task == 2:
      a, b = a % 13, b % 13
      qa.append((Q_MUL.format(a=a, b=b), str(a * b)))
    elif task == 3:
      qa.append((Q_REPEAT.format(w=w), w))
    elif task == 4:
      qa.append((Q_REVERSE.format(w=w), w[::-1]))
    else:
      qa.append((Q_LENGTH.format(w=w), str(len(w))))
  return tuple((question, answer, TEXT_ONLY) for question, answer in qa)


def plan_messages(plan: SamplePlan) -> list[dict]:
  messages = [{"role": "system", "content": SYSTEM_PROMPT}] if plan.system else []
  for k, (question, answer) in enumerate(plan.qa):
    if k == 0 and plan.scene is not None:
      question = f"{IMAGE_MARK}\n{question}"
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant", "content": answer})
  return messages


# ---- rendering ---------------------------------------------------------------------------------------
def render(scene: Scene) -> Image.Image:
  image = Image.new("RGB", (scene.width, scene.height), scene.background)
  draw = ImageDraw.Draw(image)
  for shape in scene.shapes:
    rgb = COLORS[shape.color]
    x0, y0, x1, y1 = shape.box
    if shape.kind == "circle":
      draw.ellipse(shape.box, fill=rgb)
    elif shape.kind == "square":
      draw.rectangle(shape.box, fill=rgb)
    elif shape.kind == "triangle":
      draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:  # diamond
      xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
      draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=rgb)
  if scene.number is not None:
    draw.rectangle(scene.number.box, fill=BOX_FILL, outline=TEXT_COLOR, width=1)
    draw.text(scene.number.origin, scene.number.text, fill=TEXT_COLOR, font=font(scene.number.font_px))
  if scene.word is not None:
    draw.text(scene.word.origin, scene.word.text, fill=TEXT_COLOR, font=font(scene.word.font_px))
  return image


def encode_png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", compress_level=1)  # fast; PNG keeps the exact palette colours
  return buffer.getvalue()


# ---- tokenizer corpus --------------------------------------------------------------------------------
def chat_tokens(max_tiles: int = 6) -> list[str]:
  """Marker strings the demo tokenizer must know (ChatML, NVLM image wrapper, tile tags, image context)."""
  return [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    IMAGE_MARK,
    "<Image>",
    "</Image>",
    "<|vision_pad|>",
    "<tile_global_thumbnail>",
  ] + [f"<tile_{k}>" for k in range(1, max_tiles + 1)]


def corpus_texts(n: int, seed: int = 0, *, max_tiles: int = 6, size: str = "tiny") -> list[str]:
  """Text for training the tiny demo tokenizer: every fixed phrase the generator can emit (templates
  filled with every word/colour/shape/tile answer, digits), the chat tokens, then ``n`` sampled
  conversations rendered as ChatML (planned only, no images drawn)."""
  texts = chat_tokens(max_tiles) + [SYSTEM_PROMPT, Q_NUMBER, Q_TILE, Q_WORD, "0 1 2 3 4 5 6 7 8 9"]
  texts += [Q_COUNT.format(plural=p) for p in SHAPE_PLURALS.values()]
  texts += [Q_COLOR.format(shape=s) for s in SHAPES] + list(COLORS)
  texts += [f"tile {k}" for k in range(1, max_tiles + 1)]
  for w in WORDS:
    texts += [w, w[::-1], Q_REPEAT.format(w=w), Q_REVERSE.format(w=w), Q_LENGTH.format(w=w)]
  texts += [Q_ADD.format(a=7, b=35), Q_SUB.format(a=64, b=28), Q_MUL.format(a=12, b=9)]
  source = SyntheticSource(max(n, 0), seed, size=size, max_tiles=max_tiles, system_fraction=0.5)
  for i in range(n):
    texts.append(chatml(plan_messages(source.plan(i))))
  return texts


def chatml(messages: Sequence[dict]) -> str:
  return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
