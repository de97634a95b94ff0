"""Text tokenizer: a thin wrapper over a HF ``tokenizers.Tokenizer`` read from ``tokenizer.json``, plus an
offline builder for tiny Qwen2-style byte-level BPE tokenizers used by tests and the demo.

The wrapper exists to (1) resolve the special tokens NVLM needs by name, failing with a message that names
the file and the token, (2) encode WITHOUT any post-processor additions (the chat template owns BOS/EOS) and
with character offsets, which the Processor uses to mark loss targets, and (3) stay independent of
``transformers`` at run time.

NVLM-D-72B uses the Qwen2 tokenizer: ``<|endoftext|>`` (151643, pad; also the LLM's ``bos_token_id``),
``<|im_start|>`` (151644), ``<|im_end|>`` (151645, EOS), and ``<|vision_pad|>`` as the image-context
placeholder. The transformers InternVL layout uses ``<IMG_CONTEXT>`` instead. Tile tags and ``<Image>`` are
plain text, never special tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_PAD = "<|vision_pad|>"
IMG_CONTEXT = "<IMG_CONTEXT>"
# Order fixes the ids of the tiny tokenizer: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, ...
TINY_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_PAD, IMG_CONTEXT)

# Qwen2's pre-tokenization: contractions, letter runs (with one leading non-letter), SINGLE digits,
# punctuation runs, newlines, spaces. Single digits matter for us: "<tile_12>" splits like Qwen2 would.
QWEN2_SPLIT_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Megatron's qwen2p0 ChatML (no default system message), stored in tokenizer_config.json so that
# transformers' apply_chat_template renders the same text as nvlm_jax.processing.chat_template.
CHATML_JINJA = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
  "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_TINY_CORPUS = (
  "<|im_start|>system\nAnswer the questions.<|im_end|>\n",
  "<|im_start|>user\n<Image><tile_1><tile_2><tile_3><tile_4><tile_5><tile_6><tile_global_thumbnail></Image>\n"
  "What color is the bus?\nAnswer the question using a single word or phrase.<|im_end|>\n",
  "<|im_start|>assistant\nThe bus is red.<|im_end|>\n",
  "<tile_x1_y1><tile_x2_y1><tile_x1_y2><tile_x2_y2><tile_global> <box> (0, 0), (448, 448) </box>",
  "Describe the image in detail. A cat sits on a mat next to a dog. The chart shows sales by year.",
  "How many people are in the picture? There are 3 people. What is written on the sign? STOP.",
  "Give a brief description of the image. The quick brown fox jumps over the lazy dog.",
  "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" \n\n\t",
)


class TokenizerError(ValueError):
  """A tokenizer file is missing or lacks a token the model needs."""


def _token_name(value) -> str | None:
  """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and "content" in value:
    return value["content"]
  raise TokenizerError(f"unexpected special-token entry {value!r} in tokenizer_config.json")


# What generation-facing decoders (eval answers, chat) print for an id the tokenizer does not have.
UNKNOWN_TOKEN_TEXT = "\ufffd"


class NvlmTokenizer:
  """Wrapper over ``tokenizers.Tokenizer`` with NVLM's special tokens resolved to ids."""

  def __init__(
    self,
    backend: tokenizers.Tokenizer,
    *,
    eos_token: str = IM_END,
    pad_token: str = ENDOFTEXT,
    bos_token: str | None = None,
    source: str = "<in-memory tokenizer>",
  ):
    self.backend = backend
    self.source = source
    self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
    self.eos_id = self.token_to_id(eos_token)
    self.pad_id = self.token_to_id(pad_token)
    self.bos_id = None if bos_token is None else self.token_to_id(bos_token)

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "NvlmTokenizer":
    """Load ``tokenizer.json`` (+ optional ``tokenizer_config.json``) from a directory or a file path."""
    path = Path(path)
    directory, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
    if not file.is_file():
      raise TokenizerError(f"{file}: tokenizer.json not found (only the fast-tokenizer JSON is supported)")
    try:
      backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - the Rust side raises a generic Exception
      raise TokenizerError(f"{file}: cannot parse tokenizer.json ({err})") from err
    config = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
      with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    eos = _token_name(config.get("eos_token")) or IM_END
    pad = _token_name(config.get("pad_token")) or ENDOFTEXT
    bos = _token_name(config.get("bos_token"))
    return cls(backend, eos_token=eos, pad_token=pad, bos_token=bos, source=str(file))

  def save_pretrained(self, out_dir: str | os.PathLike, *, extra_special_tokens: Sequence[str] = ()) -> Path:
    """Write ``tokenizer.json`` and a minimal ``tokenizer_config.json`` loadable by transformers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(out_dir / "tokenizer.json"))
    special = [t for t in TINY_SPECIAL_TOKENS if self.backend.token_to_id(t) is not None]
    special += [t for t in extra_special_tokens if t not in special]
    config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": self.bos_token,
      "eos_token": self.eos_token,
      "pad_token": self.pad_token,
      "unk_token": None,
      "additional_special_tokens": [t for t in special if t not in (self.eos_token, self.pad_token)],
      "clean_up_tokenization_spaces": False,
      "model_max_length": 32768,
      "chat_template": CHATML_JINJA,
    }
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
      f.write("\n")
    return out_dir

  # ---- lookups ------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def __len__(self) -> int:
    return self.vocab_size

  def token_to_id(self, token: str) -> int:
    token_id = self.backend.token_to_id(token)
    if token_id is None:
      raise TokenizerError(f"{self.source}: token {token!r} is not in the vocabulary")
    return token_id

  def has_token(self, token: str) -> bool:
    return self.backend.token_to_id(token) is not None

  def id_to_token(self, token_id: int) -> str | None:
    return self.backend.id_to_token(int(token_id))

  def is_added(self, token: str) -> bool:
    """True for added tokens (special or not): matched whole before BPE, so never split or merged."""
    return any(t.content == token for t in self.backend.get_added_tokens_decoder().values())

  def is_special(self, token: str) -> bool:
    """True for added special tokens (never split, and skipped by ``decode(skip_special_tokens=True)``)."""
    return any(t.content == token and t.special for t in self.backend.get_added_tokens_decoder().values())

  # ---- encode / decode ------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; nothing is added (no BOS/EOS), special tokens in the text are recognised."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [L], offsets int64 [L, 2])`` with [start, end) character offsets into ``text``."""
    enc = self.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int32)
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    return ids, offsets

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, unknown: str | None = None) -> str:
    """Text of token ids. The backend would drop an id outside the vocabulary silently; a model whose
    embedding is padded past the tokenizer can emit one. By default that is an error naming the id; with
    `unknown` (e.g. U+FFFD) each such id reads as that text instead, so a long generation run survives it."""
    ids = [int(i) for i in ids]
    size = self.backend.get_vocab_size(with_added_tokens=True)
    outside = sorted({i for i in ids if not 0 <= i < size})
    if not outside:
      return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
    if unknown is None:
      raise ValueError(f"token id(s) {outside[:8]} are outside the tokenizer's vocabulary (ids 0..{size - 1})")
    pieces, run = [], []
    for i in ids + [-1]:  # a sentinel closes the last run
      if 0 <= i < size:
        run.append(i)
        continue
      pieces.append(self.backend.decode(run, skip_special_tokens=skip_special_tokens))
      run = []
      pieces.append(unknown)
    return "".join(pieces[:-1])


def build_tiny_tokenizer(
  corpus_texts: Iterable[str] | None = None,
  vocab_size: int = 512,
  out_dir: str | os.PathLike | None = None,
  *,
  special_tokens: Sequence[str] = TINY_SPECIAL_TOKENS,
) -> NvlmTokenizer:
  """Train a small Qwen2-style byte-level BPE offline (deterministic) and optionally save it.

  Special tokens get the first ids in ``special_tokens`` order (``<|endoftext|>`` = 0). Every byte is in
  the initial alphabet, so any text encodes without an unknown token. With ``out_dir`` the directory gets
  ``tokenizer.json`` + ``tokenizer_config.json`` (bos=None, eos=``<|im_end|>``, pad=``<|endoftext|>``),
  loadable by :meth:`NvlmTokenizer.from_pretrained` and ``transformers.PreTrainedTokenizerFast``.
  """
  texts = list(DEFAULT_TINY_CORPUS if corpus_texts is None else corpus_texts)
  min_vocab = 256 + len(special_tokens)
  if vocab_size < min_vocab:
    raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet + special tokens ({min_vocab})")
  backend = tokenizers.Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=1,
    special_tokens=list(special_tokens),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  # Special tokens in the corpus must not be learned as BPE pieces: the trainer already splits on them
  # once they are registered as added tokens.
  backend.add_special_tokens(list(special_tokens))
  backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
  tokenizer = NvlmTokenizer(backend, eos_token=IM_END, pad_token=ENDOFTEXT, bos_token=None, source="<tiny tokenizer>")
  if out_dir is not None:
    tokenizer.save_pretrained(out_dir)
    tokenizer.source = str(Path(out_dir) / "tokenizer.json")
  return tokenizer
