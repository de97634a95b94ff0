"""Chat formats as NVLM trained them, rendered as text segments that know whether they are loss targets.

``chatml`` is Megatron's ``qwen2p0`` recipe used for NVLM-D-72B (docs/paper.md (d)): every turn is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``, there is NO default system message (unlike the stock
Qwen2-Instruct template; pass ``system_prompt=QWEN2_DEFAULT_SYSTEM_PROMPT`` to get that behaviour), and the
generation prompt is ``<|im_start|>assistant\\n``. ``nvlm-yi-34b`` (the 34B ablations) is the same ChatML
preceded by the tokenizer's BOS token. No other format exists in this module on purpose: a new one is a new
entry in :data:`CHAT_FORMATS` plus a branch in :func:`render_chat`.

Loss targets: only assistant content and its closing ``<|im_end|>``. The ``<|im_start|>assistant\\n`` prefix
is not a target (Megatron masks these 3 tokens too). The ``\\n`` after an assistant's ``<|im_end|>`` is not a
target by default; Megatron's per-turn masking does train on it, available as
``target_turn_newline=True``. (Training on it only teaches the model to emit ``\\n`` after ``<|im_end|>``,
which generation never reaches since ``<|im_end|>`` is EOS.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

CHAT_FORMATS = ("chatml", "nvlm-yi-34b")
ROLES = ("system", "user", "assistant")
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_MARK = "<image>"
QWEN2_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Aliases accepted for the format name (Megatron --prompt-format values and InternVL template names).
_FORMAT_ALIASES = {
  "chatml": "chatml",
  "qwen2p0": "chatml",
  "qwen2p5": "chatml",
  "nvlm-yi-34b": "nvlm-yi-34b",
}


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of the rendered conversation; ``is_target`` marks text the model is trained to produce."""

  text: str
  is_target: bool


def canonical_chat_format(name: str) -> str:
  try:
    return _FORMAT_ALIASES[name]
  except KeyError:
    raise ValueError(
      f"unknown chat format {name!r}; supported: {sorted(_FORMAT_ALIASES)} (only ChatML variants)"
    ) from None


def message_text(content: Any, *, where: str = "message") -> str:
  """Message content as a string. Accepts a string or a list of parts in the common multimodal layout
  (``{"type": "text", "text": ...}`` and ``{"type": "image"}``, the latter becoming an ``<image>`` mark)."""
  if isinstance(content, str):
    return content
  if isinstance(content, (list, tuple)):
    pieces = []
    for i, part in enumerate(content):
      if isinstance(part, str):
        pieces.append(part)
        continue
      if not isinstance(part, Mapping) or "type" not in part:
        raise ValueError(f"{where}: content part {i} must be a string or a dict with a 'type' key")
      if part["type"] == "text":
        pieces.append(str(part.get("text", "")))
      elif part["type"] == "image":
        pieces.append(IMAGE_MARK)
      else:
        raise ValueError(f"{where}: content part {i} has unsupported type {part['type']!r}")
    return "".join(pieces)
  raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")


def validate_messages(messages: Sequence[Mapping[str, Any]], *, where: str = "conversation") -> list[dict]:
  """Check roles/content and return ``[{"role", "content": str}]``."""
  if isinstance(messages, Mapping) or isinstance(messages, str):
    raise ValueError(f"{where}: messages must be a list of {{'role', 'content'}} dicts")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
      raise ValueError(f"{where}: message {i} must be a dict with 'role' and 'content'")
    role = message["role"]
    if role not in ROLES:
      raise ValueError(f"{where}: message {i} has unknown role {role!r}; expected one of {ROLES}")
    out.append({"role": role, "content": message_text(message["content"], where=f"{where} message {i}")})
  return out


def render_chat(
  messages: Sequence[Mapping[str, Any]],
  *,
  chat_format: str = "chatml",
  system_prompt: str | None = None,
  add_generation_prompt: bool = False,
  bos_token: str | None = None,
  target_turn_newline: bool = False,
) -> list[Segment]:
  """Render a conversation into segments (concatenate ``.text`` for the prompt string).

  ``system_prompt`` is prepended as a system turn; it is an error to pass one when the conversation
  already starts with a system message. ``bos_token`` is required by (and only used for) ``nvlm-yi-34b``.
  """
  chat_format = canonical_chat_format(chat_format)
  messages = validate_messages(messages)
  if system_prompt is not None:
    if messages and messages[0]["role"] == "system":
      raise ValueError("system_prompt given but the conversation already starts with a system message")
    messages = [{"role": "system", "content": system_prompt}] + messages

  segments: list[Segment] = []
  if chat_format == "nvlm-yi-34b":
    if not bos_token:
      raise ValueError("chat format 'nvlm-yi-34b' needs the tokenizer's bos_token")
    segments.append(Segment(bos_token, False))

  for message in messages:
    role, content = message["role"], message["content"]
    if role == "assistant":
      segments.append(Segment(f"{IM_START}assistant\n", False))
      segments.append(Segment(content + IM_END, True))
      segments.append(Segment("\n", target_turn_newline))
    else:
      segments.append(Segment(f"{IM_START}{role}\n{content}{IM_END}\n", False))
  if add_generation_prompt:
    segments.append(Segment(f"{IM_START}assistant\n", False))
  return _merge(segments)


def _merge(segments: Iterable[Segment]) -> list[Segment]:
  """Join neighbours with the same target flag and drop empty pieces (fewer, longer segments)."""
  merged: list[Segment] = []
  for seg in segments:
    if not seg.text:
      continue
    if merged and merged[-1].is_target == seg.is_target:
      merged[-1] = Segment(merged[-1].text + seg.text, seg.is_target)
    else:
      merged.append(seg)
  return merged


def render_text(segments: Sequence[Segment]) -> str:
  return "".join(seg.text for seg in segments)


def target_char_spans(segments: Sequence[Segment]) -> list[tuple[int, int]]:
  """[start, end) character ranges of the target segments in ``render_text(segments)``."""
  spans, pos = [], 0
  for seg in segments:
    end = pos + len(seg.text)
    if seg.is_target:
      spans.append((pos, end))
    pos = end
  return spans
