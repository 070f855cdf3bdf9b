"""Docstring -> function pairs mined from installed packages (site-packages), for training.

The ``package_code`` task is ``stdlib_code`` with more training data: its eval split is
exactly ``stdlib_code``'s (whole held-out stdlib modules, :func:`split_by_module`), and its
training split is ``stdlib_code``'s training functions plus functions mined, the same way
(:mod:`raykd.data.stdlib_code`: public, undecorated, documented, 2-12 body lines, prompt =
docstring summary + signature, reference = source without the docstring), from the Python
files of the interpreter's site-packages. Files are read and parsed, never imported.

What is mined, in a fixed order (sorted top-level entries, then a sorted walk):

* skipped directories: tests and test helpers, vendored and third-party copies, examples,
  docs, benchmarks, build output, metadata (:data:`SKIP_DIRS`, ``*.dist-info``, ...); skipped
  files: ``test_*.py``, ``*_test.py``, ``conftest.py``, ``setup.py``, files over
  ``max_file_bytes``; the project itself (``raykd``) and ``__*`` entries (editable finders);
* bounded: at most ``max_files_per_package`` files and ``max_per_package`` functions per
  top-level package, ``max_records`` in all;
* **held-out exclusion**: a file whose dotted module name ends with a held-out stdlib module
  (component-wise: ``backports.tarfile`` for ``tarfile``) is skipped;
* **near-duplicates of eval functions** are dropped (:mod:`raykd.data.dedup`: token 3-gram
  Jaccard >= ``dedup_threshold``, or the same name with identical identifier-abstracted
  tokens), from the mined functions and from the stdlib training functions alike; exact
  duplicate prompts or references within training are dropped too (first one wins);
* files that are not UTF-8 or do not parse (e.g. newer syntax) are skipped and counted.

Licence-agnostic: the pairs are local training data, not redistributed.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from raykd.data.dedup import NearDuplicateIndex
from raykd.data.records import TaskRecord
from raykd.data.stdlib_code import (
    _Candidate,
    _function_candidate,
    _prompt,
    mine_stdlib_functions,
    split_by_module,
)

__all__ = [
    "SKIP_DIRS",
    "build_package_code",
    "mine_package_functions",
    "remove_near_duplicates",
    "site_packages_dirs",
]

#: Directory names never descended into (compared lower-case).
SKIP_DIRS = frozenset({
    "test", "tests", "testing", "_tests", "unittests", "test_utils", "testutils",
    "vendor", "_vendor", "vendored", "_vendored", "third_party", "_third_party",
    "thirdparty", "extern", "_extern", "externals", "examples", "example", "docs", "doc",
    "benchmarks", "benchmark", "__pycache__", "build", "node_modules", "site-packages",
})  # fmt: skip
_SKIP_SUFFIXES = (".dist-info", ".egg-info", ".data", ".libs")
_SKIP_TOP = frozenset({"raykd"})


def site_packages_dirs() -> list[Path]:
    """The running interpreter's site-packages directories (purelib, then platlib if other)."""
    paths = sysconfig.get_paths()
    out: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p not in out:
            out.append(p)
    return out


def _skip_dir(name: str) -> bool:
    low = name.lower()
    return low in SKIP_DIRS or low.endswith(_SKIP_SUFFIXES) or name.startswith(".")


def _skip_file(name: str) -> bool:
    return (not name.endswith(".py") or name.startswith("test_") or name.endswith("_test.py")
            or name in ("conftest.py", "setup.py", "tests.py"))  # fmt: skip


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_files(root: Path, entry: Path, stats: Counter) -> Iterator[Path]:
    """Python files of one top-level entry, in sorted walk order, skipping what is excluded."""
    if entry.is_file():
        if not _skip_file(entry.name):
            yield entry
        return
    for dirpath, dirnames, filenames in os.walk(entry):
        kept = sorted(d for d in dirnames if not _skip_dir(d))
        stats["dirs_skipped"] += len(dirnames) - len(kept)
        dirnames[:] = kept
        for name in sorted(filenames):
            if name.endswith(".py"):
                if _skip_file(name):
                    stats["files_skipped_tests"] += 1
                else:
                    yield Path(dirpath) / name


def _held_out(module: str, held: Iterable[str]) -> bool:
    parts = module.split(".")
    for name in held:
        tail = name.split(".")
        if parts[-len(tail) :] == tail:
            return True
    return False


def _candidates(module: str, path: Path, max_file_bytes: int, stats: Counter) -> list[_Candidate]:
    """The documented functions of one file; unreadable or unparsable files count and yield none."""
    try:
        data = path.read_bytes()
    except OSError:
        stats["files_unreadable"] += 1
        return []
    if len(data) > max_file_bytes:
        stats["files_too_large"] += 1
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats["files_not_utf8"] += 1
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes etc. in third-party code
            tree = ast.parse(text, filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        stats["parse_errors"] += 1
        return []
    stats["files_parsed"] += 1
    lines = text.splitlines()
    found: list[_Candidate] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            items = [(node, None)]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith(("_", "Test")):
            items = [(n, node.name) for n in node.body
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]  # fmt: skip
        else:
            continue
        for fn, cls in items:
            try:
                cand = _function_candidate(module, fn, cls, lines)
            except (SyntaxError, ValueError, IndexError, RecursionError):
                stats["functions_unextractable"] += 1
                continue
            if cand is not None:
                found.append(cand)
    return found


def _keep(cand: _Candidate, min_lines: int, max_lines: int, min_doc: int, max_doc: int) -> bool:
    """The length filters of ``mine_stdlib_functions``."""
    return (min_lines <= cand.body_lines <= max_lines and min_doc <= len(cand.summary) <= max_doc
            and len(cand.summary.split()) >= 4 and "deprecated" not in cand.summary.lower())  # fmt: skip


def mine_package_functions(
    roots: Sequence[Path] | None = None,
    *,
    exclude_modules: Iterable[str] = (),
    max_lines: int = 12,
    min_lines: int = 2,
    min_doc_chars: int = 24,
    max_doc_chars: int = 400,
    max_files_per_package: int = 200,
    max_per_package: int = 300,
    max_records: int = 20_000,
    max_file_bytes: int = 300_000,
) -> tuple[list[TaskRecord], dict]:
    """Mine docstring -> function records from the packages under ``roots`` (module docstring).

    Returns the records (``uid`` ``"pkg/<module>.<qualname>"``; ``meta``: ``module``,
    ``package``, ``name``, ``qualname``, ``class_name``, ``lineno``, ``body_lines``,
    ``source: "site-packages"``) and counts: ``packages``, ``files_parsed``, ``parse_errors``,
    ``files_not_utf8``, ``files_unreadable``, ``files_too_large``, ``files_skipped_tests``,
    ``dirs_skipped``, ``files_held_out`` (held-out stdlib names), ``files_over_cap``,
    ``functions_found``, ``functions_kept`` (past the length filters), ``duplicates``
    (prompt or reference seen before), ``functions_over_cap``, ``records``, ``per_package``.
    """
    roots = site_packages_dirs() if roots is None else [Path(r) for r in roots]
    held = sorted(set(exclude_modules))
    stats: Counter = Counter()
    per_package: Counter = Counter()
    records: list[TaskRecord] = []
    seen: set[str] = set()
    for root in roots:
        for entry in sorted(root.iterdir(), key=lambda p: p.name):
            top = entry.name.removesuffix(".py")
            if (entry.name.startswith(("__", ".")) or top in _SKIP_TOP or _skip_dir(entry.name)
                    or (entry.is_file() and not entry.name.endswith(".py"))):  # fmt: skip
                continue
            stats["packages"] += 1
            files = 0
            for path in _package_files(root, entry, stats):
                module = _module_name(root, path)
                if _held_out(module, held):
                    stats["files_held_out"] += 1
                    continue
                full = len(records) >= max_records or per_package[top] >= max_per_package
                if full or files >= max_files_per_package:
                    stats["files_over_cap"] += 1
                    continue
                files += 1
                for cand in _candidates(module, path, max_file_bytes, stats):
                    stats["functions_found"] += 1
                    if not _keep(cand, min_lines, max_lines, min_doc_chars, max_doc_chars):
                        continue
                    stats["functions_kept"] += 1
                    prompt = _prompt(cand)
                    if prompt in seen or cand.source in seen:
                        stats["duplicates"] += 1
                        continue
                    if len(records) >= max_records or per_package[top] >= max_per_package:
                        stats["functions_over_cap"] += 1
                        continue
                    seen.update((prompt, cand.source))
                    per_package[top] += 1
                    records.append(TaskRecord(
                        uid=f"pkg/{module}.{cand.qualname}", prompt=prompt,
                        reference=cand.source,
                        meta={"module": module, "package": top, "name": cand.name,
                              "qualname": cand.qualname, "class_name": cand.class_name,
                              "lineno": cand.lineno, "body_lines": cand.body_lines,
                              "source": "site-packages"},
                    ))  # fmt: skip
    out = {key: int(stats[key]) for key in (
        "packages", "files_parsed", "parse_errors", "files_not_utf8", "files_unreadable",
        "files_too_large", "files_skipped_tests", "dirs_skipped", "files_held_out",
        "files_over_cap", "functions_found", "functions_kept", "duplicates",
        "functions_over_cap")}  # fmt: skip
    out["records"] = len(records)
    out["per_package"] = dict(sorted(per_package.items()))
    return records, out


def remove_near_duplicates(
    train: Sequence[TaskRecord], held_out: Sequence[TaskRecord], threshold: float = 0.7
) -> tuple[list[TaskRecord], dict]:
    """``train`` without near-duplicates of ``held_out`` functions (:mod:`raykd.data.dedup`)
    and without repeated prompts or references (the first wins); the counts and up to 20
    examples (``uid``, the eval ``uid`` it copies, rule, similarity)."""
    index = NearDuplicateIndex([r.reference for r in held_out],
                               [r.meta.get("name", "") for r in held_out], threshold=threshold)  # fmt: skip
    kept: list[TaskRecord] = []
    seen: set[str] = set()
    counts: Counter = Counter()
    examples = []
    for record in train:
        if record.prompt in seen or record.reference in seen:
            counts["exact_duplicates"] += 1
            continue
        match = index.match(record.reference, record.meta.get("name", ""))
        if match is not None:
            counts[f"near_duplicates_{match.kind}"] += 1
            if len(examples) < 20:
                examples.append({"uid": record.uid, "eval_uid": held_out[match.eval_index].uid,
                                 "rule": match.kind,
                                 "similarity": round(match.similarity, 3)})  # fmt: skip
            continue
        seen.update((record.prompt, record.reference))
        kept.append(record)
    return kept, {
        "threshold": threshold,
        "exact_duplicates": counts["exact_duplicates"],
        "near_duplicates_shingles": counts["near_duplicates_shingles"],
        "near_duplicates_renamed": counts["near_duplicates_renamed"],
        "examples": examples,
    }


def build_package_code(
    path: Path | None, eval_fraction: float, seed: int, *, dedup_threshold: float = 0.7,
    **mine_kwargs,
) -> tuple[list[TaskRecord], list[TaskRecord], dict]:  # fmt: skip
    """The ``package_code`` task builder: stdlib eval split (as ``stdlib_code``), training =
    stdlib training functions + functions mined under ``path`` (a directory laid out like
    site-packages; default: the interpreter's), without near-duplicates of eval functions.
    Stats: ``eval_modules``, ``mined`` (:func:`mine_package_functions`), ``dedup``
    (:func:`remove_near_duplicates`), ``train_stdlib``, ``train_packages``."""
    stdlib = mine_stdlib_functions()
    train_std, held_out = split_by_module(stdlib, eval_fraction, seed)
    held_modules = sorted({r.meta["module"] for r in held_out})
    roots = [path] if path is not None else None
    mined, mine_stats = mine_package_functions(roots, exclude_modules=held_modules, **mine_kwargs)
    train, dedup_stats = remove_near_duplicates(train_std + mined, held_out, dedup_threshold)
    from_packages = sum(r.meta.get("source") == "site-packages" for r in train)
    return (
        train,
        held_out,
        {
            "eval_modules": held_modules,
            "package_roots": [str(p) for p in (roots or site_packages_dirs())],
            "mined": mine_stats,
            "dedup": dedup_stats,
            "train_stdlib": len(train) - from_packages,
            "train_packages": from_packages,
        },
    )
