"""Default scores equal each benchmark's official scorer on the cases that separate it from NVLM's Megatron rules.

Every expected value is worked out by hand from the official definition (the script named in the test),
with the arithmetic in the comment; each case also states what `scorer="megatron"` gives where it differs.
"""

import random

import pytest

from nvlm_jax.evaluation import score_predictions
from nvlm_jax.evaluation.metrics import anls, chartqa, mathvista, mmmu, ocrbench
from nvlm_jax.evaluation.metrics import text_benchmarks as tb
from nvlm_jax.evaluation.metrics.vqa import vqa_accuracy

# ----------------------------------------------------------------------------- VQAv2 / TextVQA (vqaEval.py)


@pytest.mark.parametrize(
  "prediction, answers, official, megatron",
  [
    # Leave out a "2" (3 subsets): 2 matches -> 2/3; leave out a "3" (7 subsets): 3 matches -> 1.
    ("two", ["2"] * 3 + ["3"] * 7, (3 * 2 / 3 + 7) / 10, 1.0),
    # Leave out "cat" (1 subset): 0 matches; leave out a "dog" (9 subsets): 1 match -> 1/3.
    ("cat", ["cat"] + ["dog"] * 9, 9 * (1 / 3) / 10, 1 / 3),
    # Unanimous answers are not normalized: "Yes." != "yes" officially.
    ("Yes.", ["yes"] * 10, 0.0, 1.0),
    ("yes\n", ["yes"] * 10, 1.0, 1.0),  # the prediction's newline -> space, then stripped
    ("yes", ["yes "] * 10, 0.0, 1.0),  # ground truths are used as given (padding kept)
    # Disagreeing answers are normalized: articles and number words.
    ("the dog", ["dog"] * 4 + ["a dog"] * 6, 1.0, 1.0),
    ("Two", ["2"] * 5 + ["two"] * 5, 1.0, 1.0),
    # Contraction restored: "dont" -> "don't"; 3 subsets with 2 matches, 7 with 3.
    ("dont", ["don't"] * 3 + ["do not"] * 7, (3 * 2 / 3 + 7) / 10, 1.0),
  ],
)
def test_vqa_official_leave_one_out(prediction, answers, official, megatron):
  assert vqa_accuracy(prediction, answers) == pytest.approx(official)
  assert vqa_accuracy(prediction, answers, scorer="megatron") == pytest.approx(megatron)


def test_vqa_unknown_scorer_is_an_error():
  with pytest.raises(ValueError, match="scorer"):
    vqa_accuracy("a", ["a"], scorer="other")


# ----------------------------------------------------------------------------- DocVQA / InfoVQA (RRC server)


@pytest.mark.parametrize(
  "prediction, answers, official, megatron",
  [
    ("abcd", ["abxy"], 0.5, 0.0),  # NL = 2/4 = 0.5: the server keeps 1 - 0.5; Megatron needs NL < 0.5
    ("abcde", ["abxye"], 0.6, 0.6),  # NL = 2/5
    # Padding: distance on "abcd" vs "abxy" (2), length on the raw "  abcd  " (8): NL = 0.25.
    ("  abcd  ", ["abxy"], 0.75, 0.0),
    ("abcde  ", ["abxyz"], 1 - 3 / 7, 0.0),  # distance 3, raw length 7 (Megatron: 3/5 = 0.6 -> 0)
    # "İ".lower() is "i" + U+0307: distance 1; server length = len("İSTANBUL") = 8, Megatron's = 9.
    ("İstanbul", ["istanbul"], 1 - 1 / 8, 1 - 1 / 9),
    ("abcd", ["zzzz", "abcx"], 0.75, 0.75),  # best ground truth
    ("  New   York ", ["new york"], 1.0, 1.0),
    ("", [""], 1.0, 1.0),
    # "he 2" -> "wo" costs 4 and the "." 1: NL = 5/11. Megatron VQA-normalizes both sides to "2 dogs" first.
    ("the 2 dogs.", ["two dogs"], 1 - 5 / 11, 1.0),
  ],
)
def test_anls_server_definition(prediction, answers, official, megatron):
  assert anls.anls(prediction, answers) == pytest.approx(official)
  assert anls.anls(prediction, answers, scorer="megatron") == pytest.approx(megatron)


# ----------------------------------------------------------------------------- ChartQA (pix2struct)


@pytest.mark.parametrize(
  "prediction, label, official, megatron",
  [
    ("10", "-10", False, True),  # |10 - (-10)| / 10 = 2; Megatron's normalization drops both signs
    ("-10.4", "-10", True, True),  # 0.4 / 10 = 4%
    ("-11", "-10", False, False),  # 10%
    ("52.5", "50", True, True),  # 2.5 / 50 = 5%: the band edge is included
    ("53", "50", False, False),
    ("50%", "0.5", True, False),  # "50%" reads as 0.5 officially
    ("50%", "50", False, True),  # Megatron strips "%" instead
    ("1,234", "1234", False, True),  # float("1,234") fails: string comparison
    (" 50", "50", True, True),  # float() accepts surrounding spaces
    ("0", "0", True, True),  # a label of 0 is compared as a string
    ("0.0", "0", False, True),
    ("Yes", "yes", True, True),  # case-insensitive string match
    ("Yes.", "yes", False, True),
  ],
)
def test_chartqa_relaxed_correctness(prediction, label, official, megatron):
  assert chartqa.relaxed_accuracy(prediction, [label]) == float(official)
  assert chartqa.relaxed_accuracy(prediction, [label], scorer="megatron") == float(megatron)


# ----------------------------------------------------------------------------- OCRBench (example.py)


def test_ocrbench_one_point_per_question():
  assert ocrbench.ocrbench_hit("Hello World", ["hello", "world"], "IIIT5K") == 1
  assert ocrbench.ocrbench_hit("Hello World", ["hello", "world"], "IIIT5K", scorer="megatron") == 2
  assert ocrbench.ocrbench_hit("x ^ 2\n+ 1", ["x^2+1"], "HME100k") == 1  # spaces and newlines removed
  assert ocrbench.ocrbench_hit("X^2", ["x^2"], "HME100k") == 0  # case-sensitive
  assert ocrbench.ocrbench_hit("The word is\nSTOP", ["is stop"], "svt") == 1  # newline -> space, lower-cased


# ----------------------------------------------------------------------------- MathVista (extract + calculate)


def _free(answer, answer_type, precision=None):
  return {
    "id": "m1",
    "question_type": "free_form",
    "answers": [answer],
    "answer_type": answer_type,
    "precision": precision,
  }


@pytest.mark.parametrize(
  "prediction, row, correct, fallback, megatron",
  [
    ("-14", _free("-14", "integer"), True, False, True),
    ("14", _free("-14", "integer"), False, False, True),  # sign kept (Megatron: VQA normalization drops it)
    ("3.149", _free("3.15", "float", 2), True, False, False),  # rounded to 2 places (Megatron truncates)
    (".25", _free("0.25", "float", 2), True, False, False),  # float(".25") -> "0.25"
    ("1.50", _free("1.5", "float", 1), True, False, False),  # round(1.5, 1) -> "1.5"
    ("2.7", _free("2", "integer"), True, True, False),  # int("2.7") fails -> fallback "2.7" -> int(float) = 2
    ("The answer is 5 apples", _free("5", "integer"), True, True, True),
    ("The answer is \u22123", _free("-3", "integer"), True, True, False),  # Unicode minus
    ("about 7", _free("5", "integer"), False, True, False),
    ('The answer is "[1, 2]".', _free("[1, 2]", "list"), True, True, False),  # official quick rule
  ],
)
def test_mathvista_official_free_form(prediction, row, correct, fallback, megatron):
  judgement = mathvista.mathvista_judgement(prediction, row)
  assert (judgement.correct, judgement.used_fallback) == (correct, fallback)
  assert mathvista.mathvista_judgement(prediction, row, scorer="megatron").correct == megatron


@pytest.mark.parametrize(
  "prediction, options, gold, correct, fallback",
  [
    ("5", ["3", "5"], "B", True, False),  # the exact option text is taken as is
    ("(B) 5", ["3", "5"], "B", True, True),  # "(B)" -> B -> "5"
    ("B", ["3", "5"], "B", True, True),
    ("bananas", ["apple", "banana"], "B", True, True),  # contains one option's text
    ("", ["ab", "c"], "B", True, False),  # empty -> the most similar choice: distance 1 to "c" vs 2
    ("xyz", ["abc", "xyw"], "A", False, True),  # most similar: "xyw" (1) beats "abc" (3)
  ],
)
def test_mathvista_official_multiple_choice(prediction, options, gold, correct, fallback):
  row = {"id": "m2", "question_type": "multi_choice", "answers": [gold], "options": options, "answer_type": "text"}
  judgement = mathvista.mathvista_judgement(prediction, row)
  assert (judgement.correct, judgement.used_fallback) == (correct, fallback)


def test_mathvista_megatron_guesses_on_exact_option_text():
  row = {"id": "m3", "question_type": "multi_choice", "answers": ["B"], "options": ["1", "2"]}
  assert mathvista.mathvista_judgement("2", row).correct  # official: the choice text itself
  # Megatron's MMMU parser finds no letter in " 2 " and draws one at random (seeded by the id).
  expected = random.Random("m3").choice(["A", "B"]) == "B"
  assert mathvista.mathvista_judgement("2", row, scorer="megatron").correct == expected


def test_mathvista_summary_counts_rule_based_extractions():
  rows = [
    {**_free("5", "integer"), "id": "a", "prediction": "5"},
    {**_free("5", "integer"), "id": "b", "prediction": "I think it is 5."},
    {**_free("5", "integer"), "id": "c", "prediction": "6"},
  ]
  summary = score_predictions("mathvista", rows)
  assert summary["score"] == pytest.approx(200 / 3)
  assert summary["num_rule_based_extractions"] == 1
  untyped = {k: v for k, v in rows[1].items() if k != "answer_type"}
  with pytest.raises(ValueError, match="'b'.*answer_type"):
    score_predictions("mathvista", [untyped])
  assert score_predictions("mathvista", [untyped], scorer="megatron")["score"] == 0.0


# ----------------------------------------------------------------------------- MMMU (eval_utils.py)


def test_mmmu_official_parsing():
  options = ["red car", "blue bike", "green bus", "grey van"]
  letters = ["A", "B", "C", "D"]
  # Officially "\boxed{B}" names no letter ("{B}" is neither "(B)" nor " B "): a seeded random guess.
  guess = random.Random("validation_Art_1").choice(letters)
  assert mmmu.mmmu_correct("\\boxed{B}", ["B"], "multiple-choice", options, seed="validation_Art_1") == (guess == "B")
  assert mmmu.mmmu_correct("\\boxed{B}", ["B"], "multiple-choice", options, seed="x", scorer="megatron")
  # Option text (responses over 5 words) and the last of several letters.
  assert mmmu.mmmu_correct("I am fairly sure it shows the blue bike here", ["B"], "multiple-choice", options)
  assert mmmu.mmmu_correct("(A) no, (C) yes", ["C"], "multiple-choice", options)
  # Open answers: numbers compared rounded to 2 places, signs kept.
  assert mmmu.mmmu_correct("The answer is 9.80", ["9.8"], "open")
  assert not mmmu.mmmu_correct("so it is -5", ["5"], "open")
  assert mmmu.mmmu_correct("so it is -5", ["-5"], "open")


# ----------------------------------------------------------------------------- MATH (Hendrycks)


@pytest.mark.parametrize(
  "response, answer, official, extended",
  [
    ("\\boxed 5", "5", False, True),  # no braces: Hendrycks' remove_boxed gives None
    ("\\boxed 5 and \\frac{1}{2}", "5", False, False),  # last_boxed_only_string -> "\boxed 5 and \frac{1}"
    ("\\fbox{7}", "7", False, True),  # remove_boxed accepts only "\boxed{"
    ("\\boxed{10\\%}", "10", True, True),  # "\%" is removed
    ("\\boxed{10%}", "10", False, True),  # a bare "%" is not
    ("\\boxed{2.0}", "2", False, True),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", True, True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, True),
    ("\\boxed{-3}", "3", False, False),
  ],
)
def test_math_hendrycks_equivalence(response, answer, official, extended):
  assert tb.math_correct(response, answer) == official
  assert tb.math_correct(response, answer, extended=True) == extended


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
  "response, gold, correct",
  [
    ("The answer is \u221218", "-18", True),  # Unicode minus
    ("The answer is \u221218", "18", False),
    ("So she loses \u22125 dollars.", "-5", True),
    ("#### -7", "-7", True),
    ("#### 7", "-7", False),
  ],
)
def test_gsm8k_signs(response, gold, correct):
  assert tb.gsm8k_correct(response, gold) == correct


# ----------------------------------------------------------------------------- AI2D / RealWorldQA


def test_option_benchmarks_megatron_exact_match():
  row = {"id": "1", "answers": ["A"], "options": ["cat", "dog"], "prediction": ""}
  # Megatron normalizes "" and "A" (an article) to "": an empty answer scores; the letter reader does not.
  assert score_predictions("ai2d", [row])["score"] == 0.0
  assert score_predictions("ai2d", [row], scorer="megatron")["score"] == 100.0
  assert score_predictions("ai2d", [{**row, "prediction": "(A) cat"}])["score"] == 100.0
  assert score_predictions("ai2d", [{**row, "prediction": "(A) cat"}], scorer="megatron")["score"] == 0.0
