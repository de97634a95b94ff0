"""VQA answer normalization and VQA accuracy (VQAv2, TextVQA; reused by ChartQA, MathVista, AI2D).

The normalization reproduces the official VQA evaluation tool (GT-Vision-Lab/VQA
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`, vendored by open_flamingo as
`open_flamingo/eval/vqa_metric.py::VQAEval`), which is what NVLM's Megatron scripts call
(`examples/multimodal/evaluation/evaluate_vqav2.py`). Its quirks are kept on purpose, because
they decide which answers count as equal:

* punctuation: a mark is deleted when it touches a space (``"a, b"``) or when the text contains a
  digit-comma-digit group anywhere (``"1,000"``); otherwise it is replaced by a space;
* periods: every ``.`` not followed by a digit is deleted (``"end."`` -> ``"end"``, ``"3.14"`` stays).
  The official regex reads ``(?!<=\\d)(\\.)(?!\\d)``: its first group is a (mistyped) look-ahead
  that never fails, so only ``(?!\\d)`` matters; it is called with ``re.UNICODE`` in the *count*
  position, so at most 32 periods are removed;
* words: lower-cased, number words ``none``/``zero``..``ten`` become digits, articles
  ``a``/``an``/``the`` are dropped, and apostrophe-less contractions are restored (``"dont"`` -> ``"don't"``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCTUATION = (
  ";",
  "/",
  "[",
  "]",
  '"',
  "{",
  "}",
  "(",
  ")",
  "=",
  "+",
  "\\",
  "_",
  "-",
  ">",
  "<",
  "@",
  "`",
  ",",
  "?",
  "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIOD_REMOVALS = 32  # re.UNICODE == 32, passed as `count` by the official tool.

_NUMBER_WORDS = {
  "none": "0",
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contractions table as `written:restored` pairs. Its four capitalised keys
# ("Id've", "I'dve", "Im", "Ive") can never match lower-cased words, so they are left out; the
# odd entries ("somebody'd" -> "somebodyd", identities such as "let's") are kept as published.
_CONTRACTIONS = dict(
  pair.split(":", 1)
  for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll
let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've
mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock
oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've
she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
somethingd:something'd somethingd've:something'd've something'dve:something'd've
somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's
whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've
wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've
youll:you'll youre:you're youve:you've
""".split()
)


def process_punctuation(text: str) -> str:
  """Official `processPunctuation`: delete or space out punctuation, then strip periods."""
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for mark in _PUNCTUATION:
    # The official tool tests the *input* text, not the partially cleaned one.
    if delete_all or (mark + " " in text) or (" " + mark in text):
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIOD_REMOVALS)


def process_digit_article(text: str) -> str:
  """Official `processDigitArticle`: lower-case, number words -> digits, drop articles, fix contractions."""
  words = []
  for word in text.lower().split():
    word = _NUMBER_WORDS.get(word, word)
    if word not in _ARTICLES:
      words.append(_CONTRACTIONS.get(word, word))
  return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
  """Punctuation then digit/article processing, the order every official caller uses."""
  return process_digit_article(process_punctuation(text))


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: str = "megatron") -> float:
  """VQA accuracy of one prediction against the (usually 10) human answers.

  mode="megatron" (default; docs/paper.md (i), NVLM's `evaluate_vqav2.py`): normalize prediction and every
    answer, score ``min(1, #matching answers / 3)``.
  mode="official" (VQAv2/TextVQA evaluation server): whitespace-clean everything, normalize only if
    the human answers disagree (the official tool skips normalization when all answers are equal),
    then average ``min(1, #matches among the other n-1 answers / 3)`` over the n leave-one-out subsets.
  """
  if not answers:
    raise ValueError("vqa_accuracy needs at least one ground-truth answer")
  if mode == "megatron":
    pred = normalize_vqa_answer(prediction)
    matches = sum(pred == normalize_vqa_answer(a) for a in answers)
    return min(1.0, matches / 3.0)
  if mode == "official":
    pred = _clean_whitespace(prediction)
    gts = [_clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
      pred = normalize_vqa_answer(pred)
      gts = [normalize_vqa_answer(a) for a in gts]
    per_subset = []
    for left_out in range(len(gts)):
      matches = sum(gt == pred for i, gt in enumerate(gts) if i != left_out)
      per_subset.append(min(1.0, matches / 3.0))
    return sum(per_subset) / len(per_subset)
  raise ValueError(f"unknown VQA accuracy mode {mode!r}; expected 'megatron' or 'official'")
