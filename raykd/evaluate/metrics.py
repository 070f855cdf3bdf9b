"""Scores for generated text and code: Rouge-L, code validity (parse rate), clean stops and
retention.

All percentages are on a 0-100 scale.  Means over zero examples are ``nan`` (there is
nothing to average), and :func:`retention` is ``nan`` when the teacher score is 0 or
missing, so callers never divide by zero.
"""

from __future__ import annotations

import ast
import functools
import math
import re
import warnings
from collections.abc import Sequence
from typing import Literal

from nltk.stem import porter  # the stemmer rouge_score itself uses (a rouge_score dependency)
from rouge_score import rouge_scorer

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py"}


class RougeTokenizer:
    """Tokenizer for :class:`rouge_score.rouge_scorer.RougeScorer` that suits code and Spanish.

    The default rouge_score tokenizer keeps only ``[a-z0-9]`` runs, which deletes accented
    letters (``"está"`` becomes ``"est"``) and every code symbol.  This one lowercases,
    splits into Unicode word runs (``\\w+``, so accents and underscores stay inside words)
    and single punctuation/operator characters, and Porter-stems pure-ASCII alphabetic
    words longer than three characters (as rouge_score does with ``use_stemmer=True``).
    """

    def __init__(self, use_stemmer: bool = True) -> None:
        self._stemmer = porter.PorterStemmer() if use_stemmer else None
        self._stem = functools.lru_cache(maxsize=65536)(self._stem_uncached)

    def _stem_uncached(self, word: str) -> str:
        if self._stemmer is None or len(word) <= 3 or not (word.isascii() and word.isalpha()):
            return word
        return self._stemmer.stem(word)

    def tokenize(self, text: str) -> list[str]:
        """Lowercased word and symbol tokens of ``text``."""
        return [self._stem(tok) for tok in _TOKEN_RE.findall(text.lower())]


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    # use_stemmer is ignored by RougeScorer when a tokenizer is given; stemming is ours.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True, tokenizer=RougeTokenizer())


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Rouge-L F1 x 100 of each prediction against its reference (0 if either is empty)."""
    _check_lengths(predictions, references)
    scorer = _scorer()
    return [
        100.0 * scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references)
    ]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean Rouge-L F1 x 100 over pairs; ``nan`` for no pairs."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores) if scores else math.nan


def extract_code(text: str) -> str:
    """The code in a model answer: the first Python (or untagged) fenced block, else the text.

    An unterminated fence (generation cut off at the token limit) yields everything after
    its opening line.  A fenced block in another language is used only if no Python or
    untagged block exists.
    """
    blocks = _FENCE_RE.findall(text)
    if not blocks:
        return text.strip("\n")
    for tag, body in blocks:
        if tag.lower() in _PYTHON_TAGS:
            return body.strip("\n")
    return blocks[0][1].strip("\n")


def _parse(code: str) -> ast.Module | None:
    """``code`` parsed, or None when it is blank or is not Python."""
    if not code.strip():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in model output
            return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def code_validity(prediction: str, function_name: str | None = None) -> bool:
    """Whether ``prediction`` (after :func:`extract_code`) is Python that defines a function.

    Valid only if the code is non-blank (``ast.parse("")`` succeeds, but an empty answer is
    not a solution), parses, and contains a ``def``/``async def`` — named ``function_name``
    when one is given (at any nesting level, so a method counts).
    """
    tree = _parse(extract_code(prediction))
    if tree is None:
        return False
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (function_name is None or node.name == function_name)
        for node in ast.walk(tree)
    )


_OPEN_FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n")


def clean_stop(prediction: str, function_name: str | None = None, stopped: bool = True) -> bool:
    """Whether the answer is one function and then the end of turn.

    All of: the decode ended on its own (``stopped``: a stop token, not the token limit); the
    answer (whitespace stripped) is either bare code with no fence anywhere, or one fenced
    Python block with nothing but whitespace before its opening line and after its closing
    fence; that code parses, and its top level is imports and exactly one function (named
    ``function_name`` when given) — so a second copy of the function after a stray fence, a
    trailing explanation, or an answer cut off mid-function is not a clean stop, although
    :func:`code_validity` accepts some of them.
    """
    if not stopped:
        return False
    text = prediction.strip()
    if "```" in text:
        head = _OPEN_FENCE_RE.match(text)
        if head is None or head.group(1).lower() not in _PYTHON_TAGS:
            return False
        body, fence, rest = text[head.end() :].partition("```")
        if not fence or rest.strip():
            return False
        text = body
    tree = _parse(text)
    if tree is None:
        return False
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    others = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef
                                                     | ast.Import | ast.ImportFrom)]  # fmt: skip
    return len(defs) == 1 and not others and function_name in (None, defs[0].name)


def parse_rate(predictions: Sequence[str], names: Sequence[str | None] | None = None) -> float:
    """Percentage of predictions for which :func:`code_validity` holds; ``nan`` for none."""
    if names is None:
        names = [None] * len(predictions)
    _check_lengths(predictions, names)  # type: ignore[arg-type]
    if not predictions:
        return math.nan
    valid = sum(code_validity(p, n) for p, n in zip(predictions, names))
    return 100.0 * valid / len(predictions)


def retention(student: float | None, teacher: float | None) -> float:
    """``100 * student / teacher``: the share of the teacher's score the student keeps.

    ``nan`` when either score is missing or not finite, or the teacher scored 0.
    """
    if student is None or teacher is None:
        return math.nan
    student, teacher = float(student), float(teacher)
    if not (math.isfinite(student) and math.isfinite(teacher)) or teacher == 0.0:
        return math.nan
    return 100.0 * student / teacher


def evaluate_predictions(
    predictions: Sequence[str],
    references: Sequence[str],
    names: Sequence[str | None] | None = None,
    kind: Literal["code", "text"] = "text",
    stopped: Sequence[bool] | None = None,
) -> dict:
    """Score generations against references.

    Args:
        predictions: Model outputs (decoded, without the end-of-turn token).
        references: Reference answers, aligned with ``predictions``.
        names: For ``kind="code"``, the function each prediction must define (``None``
            entries, or ``names=None``, accept any function).
        kind: ``"code"`` scores Rouge-L on :func:`extract_code` of each prediction and adds
            the parse rate; ``"text"`` scores the raw text.
        stopped: Per prediction, whether its decode ended on a stop token; given for
            ``kind="code"``, the clean-stop rate (:func:`clean_stop`) is added.

    Returns:
        ``{"kind", "num_examples", "rouge_l", "parse_rate" (code only), "clean_stop_rate"
        (code, with ``stopped``), "per_example": [{"rouge_l": float, "parses": bool,
        "clean_stop": bool (code only)}, ...]}``.
    """
    if kind not in ("code", "text"):
        raise ValueError(f"kind must be 'code' or 'text', got {kind!r}")
    _check_lengths(predictions, references)
    if names is not None:
        _check_lengths(predictions, names)  # type: ignore[arg-type]
    scored = [extract_code(p) for p in predictions] if kind == "code" else list(predictions)
    scores = rouge_l_scores(scored, references)
    per_example: list[dict] = [{"rouge_l": s} for s in scores]
    result: dict = {
        "kind": kind,
        "num_examples": len(predictions),
        "rouge_l": sum(scores) / len(scores) if scores else math.nan,
    }
    if kind == "code":
        wanted = list(names) if names is not None else [None] * len(predictions)
        for entry, pred, name in zip(per_example, predictions, wanted):
            entry["parses"] = code_validity(pred, name)
        valid = sum(e["parses"] for e in per_example)
        result["parse_rate"] = 100.0 * valid / len(per_example) if per_example else math.nan
        if stopped is not None:
            _check_lengths(predictions, stopped)  # type: ignore[arg-type]
            for entry, pred, name, stop in zip(per_example, predictions, wanted, stopped):
                entry["clean_stop"] = clean_stop(pred, name, bool(stop))
            clean = sum(e["clean_stop"] for e in per_example)
            result["clean_stop_rate"] = (
                100.0 * clean / len(per_example) if per_example else math.nan
            )
    result["per_example"] = per_example
    return result
