"""Chat with a checkpoint from the terminal, the reply streamed token by token.

    python -m nvlm_jax.chat --checkpoint CKPT --image photo.jpg --prompt "Describe the image."   # one shot
    python -m nvlm_jax.chat --checkpoint CKPT --image a.png --image b.png                          # interactive

CKPT is a HF checkpoint dir or one of our training workdirs (as for eval.py). Images are attached to the
first user turn: its `<image>` marks stand for them in order, and when it has none, one `"<image>\\n"` per
image is put in front of it (the HF `chat()` / Megatron convention, docs/paper.md (e)). Interactive mode keeps the
conversation (the whole history is the next prompt); type /reset to start over, /exit or Ctrl-D to quit,
Ctrl-C to stop a reply.
Decoding is greedy unless --temperature > 0 (then --top-k / --top-p / --seed apply).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

IMAGE_MARK = "<image>"
REPLACEMENT_CHAR = "\ufffd"
# Longest run of tokens held back while their bytes do not yet form whole UTF-8 characters (a character
# has at most 4 bytes, so a longer incomplete run is garbage and is shown as it decodes).
MAX_PENDING_TOKENS = 4
# Prompts are left-padded to a multiple of this, so that the growing conversation recompiles the prefill
# and decode step only every PROMPT_BUCKET tokens, not on every turn.
PROMPT_BUCKET = 128


class IncrementalDecoder:
  """Turns a growing list of token ids into text pieces whose concatenation is the decoded whole.

  Byte-level BPE splits a multi-byte character over several tokens; decoding those one at a time shows
  U+FFFD. So each new token is decoded together with the tokens since the last emitted piece (plus
  the previous piece as left context, which keeps decoders that treat the first token specially,
  e.g. a leading-space rule, consistent), and the text is held back while it ends in an incomplete
  character.
  """

  def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
    self.tokenizer = tokenizer
    self.skip_special_tokens = skip_special_tokens
    self.ids: list[int] = []
    self._prefix = 0  # start of the context window
    self._read = 0  # tokens up to here have been emitted

  def _decode(self, ids: Sequence[int]) -> str:
    # A padded embedding row past the tokenizer reads as U+FFFD rather than ending the conversation.
    return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, unknown=REPLACEMENT_CHAR)

  def push(self, token_id: int) -> str:
    """Adds one token; returns the text it completes (possibly "")."""
    self.ids.append(int(token_id))
    return self._advance(final=False)

  def flush(self) -> str:
    """Whatever is still held back (call once at the end)."""
    return self._advance(final=True)

  def _advance(self, *, final: bool) -> str:
    if self._read == len(self.ids):
      return ""
    context = self._decode(self.ids[self._prefix : self._read])
    text = self._decode(self.ids[self._prefix :])
    pending = len(self.ids) - self._read
    if not final and text.endswith(REPLACEMENT_CHAR) and pending < MAX_PENDING_TOKENS:
      return ""
    if not text.startswith(context):  # a decoder that rewrote the context: emit what is new anyway
      context = context[: len(_common_prefix(context, text))]
    self._prefix, self._read = self._read, len(self.ids)
    return text[len(context) :]


def _common_prefix(a: str, b: str) -> str:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return a[:n]


def attach_images(text: str, num_images: int) -> str:
  """The first user turn with one `<image>` mark per image (prepended when the text has none)."""
  marks = text.count(IMAGE_MARK)
  if marks == 0 and num_images:
    return (IMAGE_MARK + "\n") * num_images + text
  if marks != num_images:
    raise ValueError(f"the first message has {marks} {IMAGE_MARK} mark(s) but {num_images} image(s) were given")
  return text


class ChatSession:
  """A conversation with one model: `reply(text, on_text)` streams the answer and remembers the turn."""

  def __init__(
    self,
    model,
    params,
    processor,
    *,
    images: Sequence[Any] = (),
    system_prompt: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
  ):
    from nvlm_jax.evaluation.generate_answers import eos_ids, is_multimodal  # lazy: jax loads once a chat starts

    self.model, self.params, self.processor = model, params, processor
    self.images = list(images)
    if self.images and not is_multimodal(model):
      raise ValueError(f"{type(model).__name__} is a text-only model; it cannot take --image")
    self.system_prompt = system_prompt
    self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
    self.seed = seed
    self.stop_ids = eos_ids(model, processor)
    self.messages: list[dict[str, str]] = []
    self._turn = 0

  def reset(self) -> None:
    self.messages = []

  def prompt_arrays(self, messages: Sequence[dict[str, str]]) -> dict[str, Any]:
    batch = self.processor(list(messages), self.images, add_generation_prompt=True, system_prompt=self.system_prompt)
    if not self.images:
      batch.pop("pixel_values", None)
      batch.pop("tile_mask", None)
    return batch

  def user_turn(self, text: str) -> dict[str, str]:
    """The next user message; the first one carries the image marks."""
    content = text if self.messages else attach_images(text, len(self.images))
    return {"role": "user", "content": content}

  def tokens(self, text: str) -> Iterable[int]:
    """Streams the token ids (EOS excluded) of the answer to `text` as the next user turn (not recorded)."""
    import jax

    from nvlm_jax.generation import stream_generate  # lazy: jax loads once a chat starts

    batch = self.prompt_arrays(self.messages + [self.user_turn(text)])
    rng = jax.random.key(self.seed + self._turn) if self.temperature > 0 else None
    for step in stream_generate(
      self.model,
      self.params,
      batch["input_ids"],
      attention_mask=batch["attention_mask"],
      pixel_values=batch.get("pixel_values"),
      tile_mask=batch.get("tile_mask"),
      max_new_tokens=self.max_new_tokens,
      temperature=self.temperature,
      top_k=self.top_k,
      top_p=self.top_p,
      rng=rng,
      eos_token_id=self.stop_ids,
      pad_token_id=self.processor.tokenizer.pad_id,
      pad_to_multiple_of=PROMPT_BUCKET,
    ):
      token = int(step[0])
      if token in self.stop_ids:
        return
      yield token

  def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
    """Generates the answer to `text` (streamed to on_text piece by piece) and records both turns."""
    decoder = IncrementalDecoder(self.processor.tokenizer)
    pieces = []
    for token in self.tokens(text):
      pieces.append(decoder.push(token))
      if pieces[-1] and on_text is not None:
        on_text(pieces[-1])
    pieces.append(decoder.flush())
    if pieces[-1] and on_text is not None:
      on_text(pieces[-1])
    answer = "".join(pieces)
    self.messages += [self.user_turn(text), {"role": "assistant", "content": answer}]
    self._turn += 1
    return answer


def _writer(stream: TextIO) -> Callable[[str], None]:
  def write(piece: str) -> None:
    stream.write(piece)
    stream.flush()

  return write


def interactive(session: ChatSession, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
  """The read-reply loop: /reset clears the history, /exit (or end of input) quits."""
  if session.images:
    out.write(f"[{len(session.images)} image(s) attached to the first message]\n")
  out.write("[/reset starts over, /exit quits]\n")
  while True:
    try:
      text = read("user> ")
    except EOFError:
      out.write("\n")
      return
    command = text.strip()
    if not command:
      continue
    if command in ("/exit", "/quit"):
      return
    if command == "/reset":
      session.reset()
      out.write("[conversation cleared]\n")
      continue
    out.write("assistant> ")
    out.flush()
    try:
      session.reply(text, _writer(out))
    except KeyboardInterrupt:  # Ctrl-C stops this reply (it is not kept); Ctrl-D quits
      out.write(" [interrupted]")
    out.write("\n")
    out.flush()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m nvlm_jax.chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--checkpoint", required=True, help="HF checkpoint dir or a training workdir")
  parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
  parser.add_argument("--prompt", help="answer this one message and exit (default: interactive)")
  parser.add_argument("--system", help="system prompt (default: none, as NVLM's chat format)")
  parser.add_argument("--max-new-tokens", type=int, default=512)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-k", type=int)
  parser.add_argument("--top-p", type=float)
  parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: as saved")
  parser.add_argument(
    "--tokenizer", help="directory with tokenizer.json, or a training workdir, if not beside the checkpoint"
  )
  return parser


def main(argv: list[str] | None = None, *, out: TextIO | None = None, read: Callable[[str], str] = input) -> int:
  args = build_parser().parse_args(argv)
  out = out if out is not None else sys.stdout
  from nvlm_jax import models  # lazy: jax loads once a chat starts
  from nvlm_jax.evaluation.generate_answers import load_processor  # lazy: jax loads once a chat starts

  model, params = models.load_model(args.checkpoint, dtype=args.dtype)
  processor = load_processor(args.checkpoint, model, tokenizer=args.tokenizer)
  session = ChatSession(
    model,
    params,
    processor,
    images=args.image,
    system_prompt=args.system,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    seed=args.seed,
  )
  if args.prompt is not None:
    session.reply(args.prompt, _writer(out))
    out.write("\n")
    out.flush()
    return 0
  interactive(session, read=read, out=out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
