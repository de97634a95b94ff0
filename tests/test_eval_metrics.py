"""Benchmark metrics against hand-checked cases, including the normalizations that decide ties."""

import random

import pytest

from nvlm_jax.evaluation import BENCHMARKS, get_benchmark, images_for_prompt, score_predictions
from nvlm_jax.evaluation.metrics import anls, chartqa, humaneval, mathvista, mmmu, multiple_choice, ocrbench
from nvlm_jax.evaluation.metrics import text_benchmarks as tb
from nvlm_jax.evaluation.metrics.vqa import normalize_vqa_answer, vqa_accuracy
from nvlm_jax.evaluation.prompts import rewrite_mmmu_image_tags
from nvlm_jax.evaluation.sandbox import FAILED, PASSED, TIMEOUT, ExecutionLimits

# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
  "raw, expected",
  [
    ("Two", "2"),  # number word -> digit, lower-cased
    ("none", "0"),
    ("The Dog.", "dog"),  # article dropped, final period stripped
    ("an apple", "apple"),
    ("3.14", "3.14"),  # a period before a digit is kept
    ("end.", "end"),
    ("e.g. cats", "eg cats"),
    ("1,000", "1000"),  # digit,digit: all punctuation deleted (no space)
    ("Hello, world", "hello world"),  # mark touching a space: deleted
    ("red/blue", "red blue"),  # otherwise: replaced by a space
    ("(A)", ""),  # brackets spaced out, then "a" is an article
    ("yes!", "yes"),
    ("dont", "don't"),  # contractions restored
    ("50%", "50%"),  # "%" is not in the punctuation list
    ("-5", "5"),  # "-" is
  ],
)
def test_vqa_normalization(raw, expected):
  assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_megatron_min_matches_over_three():
  answers = ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"]
  assert vqa_accuracy("two", answers, scorer="megatron") == pytest.approx(2 / 3)
  assert vqa_accuracy("Three.", answers, scorer="megatron") == 1.0
  assert vqa_accuracy("4", answers, scorer="megatron") == 0.0


# ----------------------------------------------------------------------------- ANLS


def test_anls_threshold_and_normalization():
  assert anls.levenshtein_distance("kitten", "sitting") == 3
  assert anls.anls("  New   York ", ["new york"]) == 1.0  # case and whitespace
  assert anls.anls("abcde", ["abxye"]) == pytest.approx(0.6)  # NL = 2/5 = 0.4 < 0.5
  assert anls.anls("abcd", ["abxy"], scorer="megatron") == 0.0  # NL = 2/4 = 0.5: not below threshold
  assert anls.anls("abcdefg", ["abcdxyz"]) == pytest.approx(1 - 3 / 7)  # NL = 0.43: just below
  assert anls.anls("abcd", ["zzzz", "abcx"]) == pytest.approx(0.75)  # best ground truth
  assert anls.anls("", [""]) == 1.0
  # Megatron routes DocVQA through the VQA normalization first; the challenge server does not.
  assert anls.anls("the 2 dogs.", ["two dogs"]) < 0.7
  assert anls.anls("the 2 dogs.", ["two dogs"], scorer="megatron") == 1.0


# ----------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize(
  "prediction, label, correct",
  [
    ("50%", "50", True),  # trailing % stripped
    ("52", "50", True),  # within 5%
    ("52.5", "50", True),  # band edge included
    ("53", "50", False),
    ("0.95", "1", True),
    ("1,234", "1234", True),  # thousands separator removed by the VQA normalization
    ("Yes", "yes", True),  # non-numeric: exact match after normalization
    ("Yes it is", "yes", False),
    ("-10.4", "-10", True),  # the normalization turns "-" into a space on both sides
    ("0", "0", True),
    ("0.01", "0", False),
  ],
)
def test_chartqa_megatron_relaxed_accuracy(prediction, label, correct):
  assert chartqa.relaxed_accuracy(prediction, [label], scorer="megatron") == float(correct)


# ----------------------------------------------------------------------------- option letters

OPTIONS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
  "prediction, letter",
  [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("b", "B"),
    ("**B**", "B"),
    ("[B]", "B"),
    ("B) dog", "B"),
    ("B. dog", "B"),
    ("(B) dog", "B"),
    ("The answer is B", "B"),
    ("Answer: B", "B"),
    ("The correct option is (B).", "B"),
    ("Option A is wrong; the answer is B.", "B"),
    ("dog", "B"),
    ("Dog.", "B"),
    ("a dog", "B"),  # option text (VQA-normalized)
    ("E", None),
    ("", None),
    ("it is either a cat or a dog", None),
    ("the answer is a dog", "B"),
  ],
)
def test_parse_option_letter(prediction, letter):
  assert multiple_choice.parse_option_letter(prediction, OPTIONS) == letter


def test_option_accuracy_ai2d_and_realworldqa_scorers():
  ai2d = get_benchmark("AI2D")
  rows = [
    {"id": "1", "prediction": "(C)", "answers": ["C"], "options": OPTIONS},
    {"id": "2", "prediction": "cat", "answers": ["A"], "options": OPTIONS},
    {"id": "3", "prediction": "", "answers": ["A"], "options": OPTIONS},
  ]  # empty never matches
  assert ai2d.score(rows)[0] == [1.0, 1.0, 0.0]
  # A RealWorldQA open question (no options): Megatron's normalized exact match.
  open_row = {"id": "4", "prediction": "Two.", "answers": ["2"]}
  assert get_benchmark("realworldqa").score([open_row])[0] == [1.0]


# ----------------------------------------------------------------------------- MMMU multiple choice

LETTERS = ["A", "B", "C", "D"]
CELL = {"A": "nucleus", "B": "mitochondria", "C": "ribosome", "D": "golgi apparatus"}


@pytest.mark.parametrize(
  "response, letter",
  [
    ("(B)", "B"),
    ("The answer is (C).", "C"),
    ("B", "B"),
    ("D.", "D"),
    ("(A) or maybe (C)", "C"),  # several bracketed: the last one
    ("I first thought A but it is B", "B"),  # several " X ": the last one
    ("The powerhouse of the cell is the mitochondria.", "B"),  # option content, > 5 words
    ("It is the nucleus, not the golgi apparatus at all", "D"),  # content: the last-occurring one
  ],
)
def test_mmmu_parse_multi_choice(response, letter):
  assert multiple_choice.parse_multi_choice_response(response, LETTERS, CELL, seed="x") == letter


def test_mmmu_random_fallback_is_seeded_by_sample_id():
  picks = {
    multiple_choice.parse_multi_choice_response("no idea", LETTERS, CELL, seed="validation_Art_7") for _ in range(5)
  }
  assert picks == {random.Random("validation_Art_7").choice(LETTERS)}
  # mitochondria (4 words) is too short for the content rule: falls back.
  assert multiple_choice.parse_multi_choice_response("mitochondria", LETTERS, CELL, seed=None) == "A"


def test_mmmu_answer_extraction_and_open_answers():
  assert mmmu.extract_answer_command("reasoning... \\answer{C} and \\boxed{B}") == "C"
  assert mmmu.extract_answer_command("so \\boxed{B}") == "B"
  assert mmmu.mmmu_correct(
    "Thus the answer is \\boxed{B}", ["B"], "multiple-choice", list(CELL.values()), seed="s", scorer="megatron"
  )
  assert mmmu.subject_from_id("validation_Art_Theory_12") == "Art_Theory"
  assert 42.0 in mmmu.parse_open_response("The answer is 42.")
  # The official "simple number" pattern also picks pieces of the comma and scientific forms.
  assert mmmu.extract_numbers("costs 3,000 or 2.5e3 or 7") == ["3,000", "2.5e3", "000", "2", "3", "7"]
  assert mmmu.mmmu_correct("So the total is 3000", ["3,000"], "open")
  assert mmmu.mmmu_correct("The capital is Paris", ["paris"], "open")
  assert not mmmu.mmmu_correct("The capital is Rome", ["paris"], "open")
  assert mmmu.normalize_str("x") == [" x", "x "]  # single characters padded
  assert mmmu.mmmu_correct("the value is 1.005", ["1.0"], "open")  # numbers rounded to 2 places


def test_mmmu_prompt_single_image_rewrite():
  assert rewrite_mmmu_image_tags("<image 1>") == "Answer the question in the image."
  assert rewrite_mmmu_image_tags("What is shown in <image 1>?") == "What is shown in the image?"
  assert (
    rewrite_mmmu_image_tags("Look at the figure: <image 1> What is it?")
    == "Look at the figure in the image.  What is it?"
  )
  assert rewrite_mmmu_image_tags("<image 1> Which one? <image 2>") == "Which one? "  # as Megatron
  sample = {
    "id": "validation_Biology_1",
    "question": "Which organelle is marked in <image 1>?",
    "images": ["a.png", "b.png"],
    "options": ["nucleus", "ribosome"],
    "question_type": "multiple-choice",
  }
  system, user = BENCHMARKS["mmmu"].build_prompt(sample)
  assert system == "Answer the questions."
  assert user == (
    "<image>\nWhich organelle is marked in the image?\n(A) nucleus\n(B) ribosome\n\n"
    "Answer with the option's letter from the given choices directly."
  )
  assert images_for_prompt(sample, user) == ["a.png"]  # single-image style


# ----------------------------------------------------------------------------- OCRBench


def test_ocrbench_substring_and_hme_rules():
  assert ocrbench.ocrbench_hit("The text says HELLO", ["hello"], "IIIT5K") == 1
  assert ocrbench.ocrbench_hit("new\nyork city", ["New York"], "STVQA") == 1  # newline -> space
  assert ocrbench.ocrbench_hit("hell", ["hello"], "IIIT5K") == 0
  assert ocrbench.ocrbench_hit("x ^ { 2 } + 1", ["x^{2}+1"], "HME100k") == 1  # spaces removed
  assert ocrbench.ocrbench_hit("X^{2}+1", ["x^{2}+1"], "HME100k") == 0  # case-sensitive
  assert ocrbench.ocrbench_hit("two cats", ["one", "cats"], "IIIT5K") == 1  # any ground truth


def test_ocrbench_summary_sums_points_into_components():
  def row(i, prediction, answers, category, source):
    return {"id": str(i), "prediction": prediction, "answers": answers, "category": category, "dataset_name": source}

  rows = [
    row(0, "hello", ["hello"], "Regular Text Recognition", "IIIT5K"),
    row(1, "hello", ["world"], "Artistic Text Recognition", "WordArt"),
    row(2, "x^{2}", ["x^{2}"], "Handwritten Mathematical Expression Recognition", "HME100k"),
    row(3, "Total: $5", ["$5", "5"], "Key Information Extraction", "SROIE"),
  ]
  summary = score_predictions("ocrbench", rows)
  assert summary["score"] == 3  # points, not percent; a question scores at most one point
  assert summary["components"]["Text Recognition"] == 1
  assert summary["components"]["Handwritten Mathematical Expression Recognition"] == 1
  assert summary["components"]["Key Information Extraction"] == 1
  assert summary["per_category"]["Artistic Text Recognition"] == 0


# ----------------------------------------------------------------------------- MathVista


@pytest.mark.parametrize(
  "prediction, answer, correct",
  [
    ("The answer is 5", "5", True),  # "answer is N" extracted from wordy text
    ("5.", "5", True),
    ("3.14159", "3.14", True),  # truncated to 2 decimals
    ("3.149", "3.15", False),  # truncation, not rounding
    ("2.00", "2", True),  # all-zero decimals dropped
    ("45%", "45", True),
    ("six", "6", True),  # number words via the VQA normalization
    ("The answer is 5 apples", "5", True),
    ("about 7", "5", False),
  ],
)
def test_mathvista_megatron_free_form(prediction, answer, correct):
  assert mathvista.megatron_correct(prediction, answer, "free_form") == correct


def test_mathvista_multiple_choice_and_prompt():
  sample = {
    "id": "12",
    "question": "Which is larger?",
    "images": ["m.png"],
    "options": ["3", "5"],
    "question_type": "multi_choice",
    "answers": ["B"],
  }
  assert mathvista.megatron_correct("(B) 5", "B", "multi_choice", sample["options"], seed="12")
  system, user = BENCHMARKS["mathvista"].build_prompt(sample)
  assert system == "You are math expert. Use your math knowledge to calculate the answer."
  assert user == (
    "<image>\nWhich is larger?\nA. 3\nB. 5\nAnswer with the option's letter from the given choices directly."
  )
  free = {
    "id": "13",
    "question": "How many?",
    "query": "Hint: Please answer an integer.\nQuestion: How many?",
    "images": ["m.png"],
    "question_type": "free_form",
  }
  assert BENCHMARKS["mathvista"].build_prompt(free)[1] == "<image>\nPlease answer an integer.\nQuestion: How many?"


# ----------------------------------------------------------------------------- text benchmarks


def test_mmlu_letter():
  assert tb.mmlu_correct("Answer: C", "C", ["1", "2", "3", "4"])
  assert not tb.mmlu_correct("I am not sure", "C", ["1", "2", "3", "4"])


@pytest.mark.parametrize(
  "response, expected",
  [
    ("She pays 5 * 246.8 = 1,234 dollars.\n#### 1,234", "1234"),
    ("So the total is $1,234.", "1234"),
    ("The answer is 72.", "72"),
    ("We get \\boxed{18.00}", "18.00"),
    ("First 3 then 4, so -7 in the end", "-7"),
    ("no numbers here", None),
  ],
)
def test_gsm8k_final_number_extraction(response, expected):
  assert tb.extract_gsm8k_answer(response) == expected


def test_gsm8k_scoring():
  assert tb.gsm8k_reference_answer("Natalia sold 48/2 = 24 clips...\n#### 1,072") == "1072"
  assert tb.gsm8k_correct("so the answer is 1,072 clips", "1072")
  assert tb.gsm8k_correct("\\boxed{18.00}", "18")  # compared by value
  assert not tb.gsm8k_correct("The answer is 17", "18")


def test_math_boxed_extraction_and_equivalence():
  assert tb.last_boxed_only_string("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\boxed{\\frac{1}{2}}"
  assert tb.last_boxed_content("x = \\boxed{\\sqrt{2}}") == "\\sqrt{2}"
  assert tb.last_boxed_content("\\fbox{7}") is None  # Hendrycks' remove_boxed reads only \\boxed{
  assert tb.last_boxed_content("\\fbox{7}", extended=True) == "7"
  assert tb.last_boxed_content("no box") is None
  assert tb.math_correct("so \\boxed{\\frac{1}{2}}", "\\dfrac12")  # dfrac->frac, \frac12 -> \frac{1}{2}
  assert tb.math_correct("\\boxed{0.5}", "\\frac{1}{2}")  # the 0.5 special case
  assert tb.math_correct("\\boxed{1/2}", "\\frac{1}{2}")  # a/b -> \frac{a}{b}
  assert tb.math_correct("\\boxed{\\left( 3, 4 \\right)}", "(3,4)")  # \left/\right, spaces
  assert tb.math_correct("\\boxed{10\\%}", "10")
  assert tb.math_correct("\\boxed{5 \\text{ cm}}", "5")  # units on the right
  assert tb.math_correct("\\boxed{x = 5}", "5")  # short "x =" prefix
  assert tb.math_correct("\\boxed{90^\\circ}", "90")
  assert tb.math_correct("\\boxed{\\!3\\sqrt2}", "3\\sqrt{2}")  # \! and \sqrt2
  assert not tb.math_correct("\\boxed{2.0}", "2")  # Hendrycks keeps "2.0"
  assert tb.math_correct("\\boxed{2.0}", "2", extended=True)
  assert tb.math_correct("\\boxed{1,000}", "1000", extended=True)
  assert not tb.math_correct("no boxed answer 5", "5")
  assert tb.is_equiv("\\frac", "\\frac")  # normalization fails (IndexError): raw comparison


# ----------------------------------------------------------------------------- HumanEval (separate processes)

PROBLEM = {
  "id": "HumanEval/0",
  "question": 'def add(a, b):\n    """Return a + b."""\n',
  "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
  "entry_point": "add",
  "answers": ["    return a + b\n"],
}


def test_humaneval_execution_in_separate_processes():
  completions = [
    "    return a + b\n",  # continuation: passes
    "```python\ndef add(a, b):\n    return b + a\n```",  # fenced full function: passes
    "    return a - b\n",  # wrong: assertion fails
    "    x = bytearray(8 * 1024 ** 3)\n    return a + b\n",  # 8 GiB: MemoryError under RLIMIT_AS
    "    import sys\n    sys.exit(0)\n",  # exits 0 before the checks
  ]
  # The limit only bounds the program (start-up excluded); these finish in milliseconds.
  limits = ExecutionLimits(timeout_s=30.0, memory_bytes=512 << 20)
  (results,) = humaneval.check_completions([PROBLEM], [completions], limits, max_parallel=len(completions))
  assert [r.status for r in results] == [PASSED, PASSED, FAILED, FAILED, FAILED]
  assert "AssertionError" in results[2].stderr_tail
  assert "MemoryError" in results[3].stderr_tail
  assert "SystemExit: 0" in results[4].stderr_tail


def test_humaneval_infinite_loop_times_out():
  (results,) = humaneval.check_completions(
    [PROBLEM], [["    while True:\n        pass\n"]], ExecutionLimits(timeout_s=1.0), max_parallel=1
  )
  assert results[0].status == TIMEOUT
  assert results[0].duration_s >= 1.0


def test_humaneval_pass_at_k_and_summary():
  assert humaneval.estimate_pass_at_k(5, 2, 1) == pytest.approx(0.4)
  assert humaneval.estimate_pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
  assert humaneval.estimate_pass_at_k(5, 4, 2) == 1.0
  rows = [
    {**PROBLEM, "prediction": ["    return a + b\n", "    return 0\n"]},
    {**PROBLEM, "id": "HumanEval/1", "prediction": ["    return a * b\n", "    return a * b\n"]},
  ]
  summary = score_predictions("humaneval", rows)
  assert summary["score"] == pytest.approx(25.0)
  assert summary["pass_at_k"] == {"pass@1": pytest.approx(25.0)}


# ----------------------------------------------------------------------------- registry and scoring


def test_registry_prompts_follow_spec():
  sample = {"id": "1", "question": "What color is the bus?", "images": ["bus.jpg"]}
  assert BENCHMARKS["vqav2"].build_prompt(sample) == (
    "Follow the user's instruction and answer questions.",
    "<image>\nWhat color is the bus?\nAnswer the question using a single word or phrase.",
  )
  for name in ("textvqa", "docvqa", "infovqa"):
    assert BENCHMARKS[name].build_prompt(sample)[1].endswith("single word, phrase, or number.")
  assert BENCHMARKS["ocrbench"].build_prompt(sample)[1] == "<image>\nWhat color is the bus?"
  ai2d = {**sample, "options": ["red", "blue"]}
  assert BENCHMARKS["ai2d"].build_prompt(ai2d)[1] == (
    "<image>\nWhat color is the bus?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
  )
  gsm = {"id": "g", "question": "2+2?", "images": []}
  assert BENCHMARKS["gsm8k"].build_prompt(gsm)[1].startswith("2+2?\nPlease reason step by step")
  assert "```python\ndef add(a, b):" in BENCHMARKS["humaneval"].build_prompt(PROBLEM)[1]
  for benchmark in BENCHMARKS.values():
    assert benchmark.max_new_tokens > 0 and benchmark.system_prompt and benchmark.source
  assert get_benchmark("MathVista") is BENCHMARKS["mathvista"]
  with pytest.raises(KeyError, match="unknown benchmark"):
    get_benchmark("nope")


def test_score_predictions_summary_and_errors():
  rows = [
    {"id": "1", "prediction": "two", "answers": ["2"] * 10, "category": "number"},
    {"id": "2", "prediction": "no", "answers": ["yes"] * 10, "category": "yes/no"},
    {"id": "3", "prediction": "yes", "answers": ["yes"] * 10, "category": "yes/no"},
  ]
  summary = score_predictions("vqav2", rows, per_sample=True, scorer="megatron")
  assert summary["benchmark"] == "vqav2" and summary["num_samples"] == 3
  assert summary["score"] == pytest.approx(200 / 3)
  assert summary["per_category"] == {"number": 100.0, "yes/no": 50.0}
  assert summary["per_sample"] == {"1": 1.0, "2": 0.0, "3": 1.0}
  # The official scorer skips normalization for unanimous answers, so "two" does not match "2".
  assert score_predictions("vqav2", rows)["score"] == pytest.approx(100 / 3)
  with pytest.raises(ValueError, match="unknown metric option"):
    score_predictions("vqav2", rows, tolerance=0.1)
  with pytest.raises(ValueError, match="missing \\['answers'\\]"):
    score_predictions("vqav2", [{"id": "9", "prediction": "x"}])
  with pytest.raises(ValueError, match="duplicate id"):
    score_predictions("vqav2", rows + rows[:1])


def test_mmmu_summary_per_subject_and_domain():
  rows = [
    {
      "id": "validation_Art_1",
      "prediction": "(A)",
      "answers": ["A"],
      "options": ["x", "y"],
      "question_type": "multiple-choice",
    },
    {
      "id": "validation_Music_1",
      "prediction": "(B)",
      "answers": ["A"],
      "options": ["x", "y"],
      "question_type": "multiple-choice",
    },
    {"id": "validation_Physics_2", "prediction": "it is 9.8", "answers": ["9.8"], "question_type": "open"},
  ]
  summary = score_predictions("mmmu", rows)
  assert summary["per_category"] == {"Art": 100.0, "Music": 0.0, "Physics": 100.0}
  assert summary["per_domain"]["Art and Design"] == {"score": 50.0, "num_samples": 2}
  assert summary["per_domain"]["Science"] == {"score": 100.0, "num_samples": 1}
