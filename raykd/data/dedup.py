"""Near-duplicate detection of Python functions, to keep copies of eval functions out of training.

A function's source (signature and body, docstring already removed) becomes a token sequence
with :mod:`tokenize`: comments, line breaks and indentation tokens are dropped, every string
literal becomes ``<str>`` and every number ``<num>``; names, keywords and operators stay.
A training function is a near-duplicate of an eval function when either

* **shingles**: the Jaccard similarity of the two sets of token ``k``-grams (default 3) is at
  least ``threshold`` (default 0.7): ``|A & B| / |A | B|``; or
* **renamed copy**: the two functions have the same name and the same token sequence once
  every identifier (except keywords) is replaced by ``<id>``.

Candidates are found through an inverted index from shingle to eval functions, so only pairs
that share a shingle are scored.
"""

from __future__ import annotations

import io
import keyword
import tokenize
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["NearDuplicateIndex", "code_tokens", "shingles"]

_DROP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
         tokenize.ENCODING, tokenize.ENDMARKER}  # fmt: skip


def code_tokens(source: str) -> list[str]:
    """The normalised tokens of ``source`` (module docstring); untokenisable text falls back
    to whitespace-split words."""
    out: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in _DROP:
                continue
            if tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_START", -1):
                out.append("<str>")
            elif tok.type == tokenize.NUMBER:
                out.append("<num>")
            elif tok.type in (getattr(tokenize, "FSTRING_MIDDLE", -1),
                              getattr(tokenize, "FSTRING_END", -1)):  # fmt: skip
                continue
            else:
                out.append(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return source.split()
    return out


def shingles(tokens: Sequence[str], k: int = 3) -> frozenset[tuple[str, ...]]:
    """The set of ``k``-grams of ``tokens`` (the whole sequence when it is shorter)."""
    if len(tokens) <= k:
        return frozenset([tuple(tokens)])
    return frozenset(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1))


def _renamed(tokens: Sequence[str]) -> tuple[str, ...]:
    return tuple("<id>" if t.isidentifier() and not keyword.iskeyword(t) else t for t in tokens)


@dataclass(frozen=True)
class Match:
    """Why a function was flagged: ``kind`` (``"shingles"`` or ``"renamed"``), the index of
    the eval function it copies, and the Jaccard similarity of their shingle sets."""

    kind: str
    eval_index: int
    similarity: float


class NearDuplicateIndex:
    """The eval functions, indexed; :meth:`match` tells whether a function copies one."""

    def __init__(self, sources: Sequence[str], names: Sequence[str], threshold: float = 0.7,
                 k: int = 3):  # fmt: skip
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if len(sources) != len(names):
            raise ValueError(f"{len(sources)} sources but {len(names)} names")
        self.threshold, self.k = threshold, k
        self._sets: list[frozenset] = []
        self._index: dict[tuple[str, ...], list[int]] = {}
        self._renamed: dict[tuple[str, tuple[str, ...]], int] = {}
        for i, (source, name) in enumerate(zip(sources, names, strict=True)):
            tokens = code_tokens(source)
            grams = shingles(tokens, k)
            self._sets.append(grams)
            for g in grams:
                self._index.setdefault(g, []).append(i)
            self._renamed.setdefault((name, _renamed(tokens)), i)

    def __len__(self) -> int:
        return len(self._sets)

    def match(self, source: str, name: str) -> Match | None:
        """The eval function ``source`` copies, or ``None``: the most similar one by shingles
        if any reaches the threshold, else a renamed copy of the same name."""
        tokens = code_tokens(source)
        grams = shingles(tokens, self.k)
        shared = Counter(i for g in grams for i in self._index.get(g, ()))
        best: Match | None = None
        for i, inter in sorted(shared.items()):
            sim = inter / (len(grams) + len(self._sets[i]) - inter)
            if sim >= self.threshold and (best is None or sim > best.similarity):
                best = Match("shingles", i, sim)
        if best is None:
            hit = self._renamed.get((name, _renamed(tokens)))
            if hit is not None:
                best = Match("renamed", hit, _jaccard(grams, self._sets[hit]))
        return best


def _jaccard(a: frozenset, b: frozenset) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0
