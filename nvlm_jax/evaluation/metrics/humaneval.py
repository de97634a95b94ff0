"""HumanEval functional correctness (pass@k), executed out of process.

Follows OpenAI's human-eval (`human_eval/execution.py::check_correctness`,
`human_eval/evaluation.py::estimate_pass_at_k`): the program is the problem prompt, the completion,
the problem's `test` code and ``check(<entry_point>)``; a sample passes when that program exits
normally within the time limit (3 s in the reference). pass@k is the unbiased estimator
``1 - C(n-c, k) / C(n, k)`` over n completions of which c pass; with one completion per problem,
pass@1 is the fraction of problems solved.

The reference runs the program with `exec` and counts any exception, SystemExit included, as a
failure. Here each program runs in its own sandboxed process (`evaluation/sandbox.py`), which passes it
only when that `exec` returned normally, signalled out of band: printed text, ``sys.exit(0)`` or
``os._exit(0)`` never pass.

Chat models usually answer with a fenced code block holding the whole function rather than a
continuation of the prompt. `build_program` therefore takes the first fenced block if there is one,
and when that code defines the entry point itself, appends it after the prompt (the later definition
wins; the prompt still provides the imports) instead of splicing it into the prompt's function body.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from nvlm_jax.evaluation.sandbox import ExecutionLimits, ExecutionResult, run_python_programs

_FENCED_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
  """The first fenced code block of a completion, or the completion itself."""
  match = _FENCED_BLOCK.search(completion)
  return match.group(1) if match else completion


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
  code = extract_code(completion)
  if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
    body = prompt + "\n" + code  # the prompt's docstring-only function is a valid body
  else:
    body = prompt + code
  return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def estimate_pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  if not 0 <= num_correct <= num_samples:
    raise ValueError(f"num_correct={num_correct} outside [0, num_samples={num_samples}]")
  if k > num_samples:
    raise ValueError(f"pass@{k} needs at least {k} samples per problem, found {num_samples}")
  if num_samples - num_correct < k:
    return 1.0
  return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def check_completions(
  problems: Sequence[dict],
  completions: Sequence[Sequence[str]],
  limits: ExecutionLimits | None = None,
  max_parallel: int | None = None,
) -> list[list[ExecutionResult]]:
  """Execute every completion of every problem (each in its own process); results per problem.

  A problem needs "question" (the HumanEval prompt), "test" and "entry_point".
  """
  if len(problems) != len(completions):
    raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
  programs, owners = [], []
  for index, (problem, samples) in enumerate(zip(problems, completions)):
    for completion in samples:
      programs.append(build_program(problem["question"], completion, problem["test"], problem["entry_point"]))
      owners.append(index)
  results = run_python_programs(programs, limits or ExecutionLimits(), max_parallel)
  grouped: list[list[ExecutionResult]] = [[] for _ in problems]
  for owner, result in zip(owners, results):
    grouped[owner].append(result)
  return grouped
