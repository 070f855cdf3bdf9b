"""Execution-based scores of code answers: tests run in the sandbox, pass@k, format, reasoning.

A problem with tests carries them in its example's ``meta`` (``TaskRecord.meta``):

``tests``
    a list; each test is either a **string** of Python run after the answer in its namespace
    (``assert f(2) == 4``; HumanEval's ``check`` function followed by ``check(entry_point)``),
    or an **input/output pair** ``{"input": str, "output": str}``: the answer runs as
    ``__main__`` with ``input`` on stdin and must print ``output`` (trailing whitespace per
    line and trailing blank lines ignored), as on Codeforces.
``setup`` (optional)
    code run before the answer: imports, helper functions (HumanEval: the prompt itself).
``entry_point`` (optional)
    the function the answer must define. An answer that does not define it is taken as the
    continuation of ``setup`` (a HumanEval-style function body) and appended to it directly.
``format`` (optional)
    ``"code"`` (default) or ``"think_answer"``: what a compliant answer looks like.

The answer's code is :func:`answer_code`: the ``<answer>…</answer>`` block when there is one
(else the text after ``</think>``, else the whole text), then the first Python fenced block
(:func:`raykd.evaluate.metrics.extract_code`). Programs that do not parse fail without a run.

Every run is one sandboxed process tree (:mod:`raykd.sandbox`), judged by the parent from a
token the program never sees, so an answer that exits early, prints "passed" or kills its
parent never passes. :func:`run_tests` runs the string tests of one answer **together**
(one process; one verdict for all of them) and each input/output pair separately;
``per_test=True`` re-runs the string tests of an answer that failed together one at a time,
so that the fraction of tests passed is known (an answer that passes them together passes
them all: the fraction is then 1 without further runs).

pass@k (Chen et al. 2021, unbiased): with ``n`` samples per problem of which ``c`` pass all
tests, ``pass@k = 1 - C(n - c, k) / C(n, k)``, averaged over problems (:func:`pass_at_k`).
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from raykd.evaluate.metrics import extract_code
from raykd.sandbox import Limits, Sandbox

#: The reasoning format ``<think>…</think><answer>…</answer>`` (same rule as the ``format``
#: reward, :func:`raykd.rewards.text.format_reward`; a unit test keeps the two equal).
REASONING_FORMAT = re.compile(
    r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*",
    re.DOTALL,
)
_THINK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL)


def answer_code(text: str) -> str:
    """The code of an answer: its ``<answer>`` block (or what follows ``</think>``), then the
    first Python fenced block of that (or all of it)."""
    m = _ANSWER.search(text)
    if m:
        text = m.group(1)
    elif "</think>" in text:
        text = text.split("</think>", 1)[1]
    return extract_code(text)


def reasoning_words(text: str) -> int:
    """Whitespace-separated words inside the first ``<think>`` block (0 without one)."""
    m = _THINK.search(text)
    return len(m.group(1).split()) if m else 0


def _parses(code: str) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in model output
            return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _defines(tree: ast.Module | None, name: str) -> bool:
    return tree is not None and any(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
        for n in ast.walk(tree)
    )


def format_ok(text: str, meta: Mapping) -> bool:
    """Whether an answer has the task's format: ``think_answer`` -- the reasoning format
    above, with a non-empty answer; ``code`` -- its code parses and defines ``entry_point``
    (any function without one)."""
    if meta.get("format") == "think_answer":
        return bool(REASONING_FORMAT.fullmatch(text)) and bool(answer_code(text).strip())
    code = answer_code(text)
    tree = _parses(code) if code.strip() else None
    if tree is None:
        return False
    name = meta.get("entry_point")
    if name:
        return _defines(tree, name)
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(tree))


def program_for(text: str, meta: Mapping) -> str | None:
    """The program to run for an answer (``setup`` + its code), or ``None`` when the answer
    has no code or the program does not parse (it fails without a run)."""
    code = answer_code(text)
    if not code.strip():
        return None
    setup, name = meta.get("setup") or "", meta.get("entry_point")
    if setup and name and not _defines(_parses(code), name):
        program = setup + code  # a function body continuing the setup's signature
    else:
        program = f"{setup}\n{code}" if setup else code
    return program if _parses(program) is not None else None


@dataclass
class TestOutcome:
    """Tests one answer passed: ``passed`` of ``total``; ``status`` is ``passed`` (all),
    ``no_tests``, ``no_code`` (empty or does not parse), or the first failing run's
    sandbox status (``failed``/``timeout``/``crashed``/``limit``/``error``)."""

    passed: int
    total: int
    status: str

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def _units(program: str, tests: Sequence, together: bool) -> list[tuple[dict, int]]:
    """``(sandbox run keywords, tests it decides)``: string tests together (or one each),
    each input/output pair on its own."""
    strs = [t for t in tests if isinstance(t, str)]
    pairs = [t for t in tests if isinstance(t, Mapping)]
    units: list[tuple[dict, int]] = []
    if strs and together:
        units.append(({"code": program, "tests": "\n\n".join(strs)}, len(strs)))
    elif strs:
        units += [({"code": program, "tests": t}, 1) for t in strs]
    for p in pairs:
        units.append(
            ({"code": program, "stdin": str(p["input"]), "expected_stdout": str(p["output"])}, 1)
        )
    return units


def run_tests(
    examples: Sequence,
    completions: Sequence[str],
    *,
    per_test: bool = False,
    sandbox: Sandbox | None = None,
    limits: Limits | None = None,
    workers: int | None = None,
) -> list[TestOutcome]:
    """Run each completion against its example's ``meta["tests"]`` (all runs of the batch in
    parallel, ``workers`` at a time); one :class:`TestOutcome` per completion."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples for {len(completions)} completions")
    sandbox = sandbox or Sandbox()
    outcomes: list[TestOutcome | None] = [None] * len(completions)
    jobs: list[tuple[int, dict, int]] = []  # (completion index, run keywords, tests decided)
    totals = [0] * len(completions)
    for i, (ex, text) in enumerate(zip(examples, completions)):
        meta = getattr(ex, "meta", None) or {}
        tests = meta.get("tests") or []
        totals[i] = len(tests)
        program = program_for(text, meta) if tests else None
        if not tests:
            outcomes[i] = TestOutcome(0, 0, "no_tests")
        elif program is None:
            outcomes[i] = TestOutcome(0, len(tests), "no_code")
        else:
            jobs += [(i, kw, n) for kw, n in _units(program, tests, together=True)]
    verdicts = _run(sandbox, [kw for _, kw, _ in jobs], limits, workers)
    passed, first_bad = [0] * len(completions), [None] * len(completions)
    retry: list[tuple[int, dict, int]] = []
    for (i, kw, n), v in zip(jobs, verdicts):
        if v.passed:
            passed[i] += n
            continue
        if per_test and n > 1:  # string tests that failed together: run them one at a time
            tests = [t for t in examples[i].meta["tests"] if isinstance(t, str)]
            retry += [(i, kw2, 1) for kw2, _ in _units(kw["code"], tests, together=False)]
        first_bad[i] = first_bad[i] or v.status
    for (i, _, n), v in zip(retry, _run(sandbox, [kw for _, kw, _ in retry], limits, workers)):
        passed[i] += n if v.passed else 0
    for i in range(len(completions)):
        if outcomes[i] is None:
            status = "passed" if passed[i] == totals[i] else (first_bad[i] or "failed")
            outcomes[i] = TestOutcome(passed[i], totals[i], status)
    return outcomes  # type: ignore[return-value]


def _run(sandbox: Sandbox, items: list[dict], limits, workers) -> list:
    if not items:
        return []
    return sandbox.run_many(items, max_workers=workers or min(len(items), 4), limits=limits)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``1 - C(n - c, k) / C(n, k)`` (``n`` samples, ``c``
    correct, ``1 <= k <= n``): the chance that at least one of ``k`` samples drawn without
    replacement from the ``n`` passes."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def execution_metrics(
    examples: Sequence,
    predictions: Sequence[str],
    sampled: Sequence[Sequence[str]] = (),
    *,
    ks: Sequence[int] = (1,),
    limits: Limits | None = None,
    workers: int | None = None,
) -> dict:
    """Scores of a model on the examples that have tests (``{}`` when none has):

    ``pass_at_1``        % of problems whose greedy answer passes all tests;
    ``pass_at_1_stderr`` its binomial standard error ``100 sqrt(p (1 - p) / N)``;
    ``tests_passed``     mean % of a problem's tests its greedy answer passes (partial credit);
    ``sampled_pass_at_k`` unbiased pass@k over the ``n = len(sampled)`` sampled decodes
                         (each ``k`` of ``ks`` with ``k <= n``), in %;
    ``format_rate``      % of greedy answers in the task's format (:func:`format_ok`);
    ``reasoning_words``  mean words inside ``<think>`` of the greedy answers;
    ``num_with_tests``   N; and ``per_example``: ``{"passed", "tests_passed", "tests_total",
    "status", "format_ok"}`` per example (``None`` for examples without tests).
    """
    idx = [i for i, ex in enumerate(examples) if (ex.meta or {}).get("tests")]
    if not idx:
        return {}
    exs = [examples[i] for i in idx]
    sandbox = Sandbox()
    greedy = run_tests(exs, [predictions[i] for i in idx], per_test=True, sandbox=sandbox,
                       limits=limits, workers=workers)  # fmt: skip
    n_prob = len(idx)
    p = sum(o.all_passed for o in greedy) / n_prob
    out: dict = {
        "num_with_tests": n_prob,
        "pass_at_1": 100.0 * p,
        "pass_at_1_stderr": 100.0 * math.sqrt(p * (1.0 - p) / n_prob),
        "tests_passed": 100.0 * sum(o.fraction for o in greedy) / n_prob,
        "format_rate": 100.0
        * sum(format_ok(predictions[i], examples[i].meta) for i in idx)
        / n_prob,
        "reasoning_words": sum(reasoning_words(predictions[i]) for i in idx) / n_prob,
    }
    if sampled:
        n = len(sampled)
        flat = run_tests(exs * n, [s[i] for s in sampled for i in idx], sandbox=sandbox,
                         limits=limits, workers=workers)  # fmt: skip
        correct = [sum(flat[r * n_prob + j].all_passed for r in range(n)) for j in range(n_prob)]
        for k in ks:
            if 1 <= k <= n:
                out[f"sampled_pass_at_{k}"] = (
                    100.0 * sum(pass_at_k(n, c, k) for c in correct) / n_prob
                )
    per: list[dict | None] = [None] * len(examples)
    for j, i in enumerate(idx):
        o = greedy[j]
        per[i] = {"passed": o.all_passed, "tests_passed": o.passed, "tests_total": o.total,
                  "status": o.status, "format_ok": format_ok(predictions[i], examples[i].meta)}  # fmt: skip
    out["per_example"] = per
    return out
