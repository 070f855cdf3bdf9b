"""Offline docstring -> function task mined from the Python standard library.

A PyTorrent-style code-generation task that needs no download: the prompt is the first
paragraph of a function's docstring plus its signature, the reference is the function's
source with the docstring removed.  Sources are read as files from the interpreter's
stdlib directory and parsed with :mod:`ast`; nothing is imported or executed.

The split is by module (:func:`split_by_module`): every eval function comes from a module
no training function came from, so the eval set measures generalisation rather than
recall of neighbouring code.  The mined set depends on the Python version (the stdlib
changes), but is deterministic for a given interpreter.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from raykd.data.records import TaskRecord
from raykd.data.split import check_fraction, seeded_order, stable_fraction

logger = logging.getLogger(__name__)

#: Pure-Python stdlib modules mined, in this fixed order (``a.b`` means ``a/b.py`` or
#: ``a/b/__init__.py``).  Modules missing from the running interpreter are skipped.
#: ``ntpath`` is deliberately absent: it mirrors ``posixpath`` function by function,
#: which would leak eval functions into training across the module split.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd", "codecs",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "difflib", "dis", "email._parseaddr", "email.header", "email.utils", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "genericpath", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "html", "html.parser", "http.cookiejar",
    "http.cookies", "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder",
    "keyword", "linecache", "locale", "mailbox", "mimetypes", "netrc", "numbers", "operator",
    "optparse", "pathlib", "pickletools", "platform", "plistlib", "poplib", "posixpath",
    "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shlex",
    "shutil", "smtplib", "statistics", "string", "stringprep", "subprocess", "symtable",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "turtle", "urllib.parse", "urllib.request", "wave", "weakref",
    "webbrowser", "xml.dom.minidom", "zipapp", "zipfile",
)  # fmt: skip


@dataclass(frozen=True)
class _Candidate:
    """A documented function found in a module, before the length filters."""

    module: str
    qualname: str
    name: str
    class_name: str | None
    signature: str
    summary: str
    source: str
    body_lines: int
    lineno: int


def stdlib_dir() -> Path:
    """Directory holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_path(module: str, root: Path | None = None) -> Path | None:
    """Source file of a stdlib module (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``)."""
    base = (root or stdlib_dir()).joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _summary(docstring: str) -> str:
    """First paragraph of a docstring, whitespace-normalised to one line."""
    paragraph = inspect.cleandoc(docstring).strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split())


def _strip_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """Source of ``node`` without its docstring lines, dedented; ``None`` if not separable."""
    doc, first_stmt = node.body[0], node.body[1]
    if doc.lineno <= node.lineno or first_stmt.lineno <= (doc.end_lineno or doc.lineno):
        return None  # docstring shares a line with the signature or with code
    assert node.end_lineno is not None and doc.end_lineno is not None
    kept = lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    source = textwrap.dedent("\n".join(kept)).strip("\n")
    try:
        ast.parse(source)
    except SyntaxError:  # e.g. a multi-line string literal that defeats dedent
        return None
    return source


def _function_candidate(
    module: str,
    node: ast.FunctionDef | ast.AsyncFunctionDef,
    class_name: str | None,
    lines: list[str],
) -> _Candidate | None:
    if node.name.startswith("_") or node.name.lower().startswith("test") or node.decorator_list:
        return None
    docstring = ast.get_docstring(node, clean=False)
    if docstring is None or len(node.body) < 2:
        return None
    source = _strip_docstring(node, lines)
    if source is None:
        return None
    assert node.end_lineno is not None and node.body[0].end_lineno is not None
    body = lines[node.body[0].end_lineno : node.end_lineno]  # after the docstring
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    qualname = f"{class_name}.{node.name}" if class_name else node.name
    return _Candidate(
        module=module,
        qualname=qualname,
        name=node.name,
        class_name=class_name,
        signature=f"{node.name}({ast.unparse(node.args)}){returns}",
        summary=_summary(docstring),
        source=source,
        body_lines=sum(1 for line in body if line.strip()),
        lineno=node.lineno,
    )


@functools.cache
def _scan_module(module: str, path: str) -> tuple[_Candidate, ...]:
    """All documented public top-level functions and methods of one source file."""
    text = Path(path).read_text(encoding="utf-8")
    tree = ast.parse(text, filename=path)
    lines = text.splitlines()
    found: list[_Candidate] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            cand = _function_candidate(module, node, None, lines)
            if cand:
                found.append(cand)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith(("_", "Test")):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    cand = _function_candidate(module, item, node.name, lines)
                    if cand:
                        found.append(cand)
    return tuple(found)


def _prompt(cand: _Candidate) -> str:
    where = f" (a method of class `{cand.class_name}`)" if cand.class_name else ""
    return f"Write a Python function `{cand.signature}`{where} that: {cand.summary}"


def mine_stdlib_functions(
    max_lines: int = 12,
    seed: int | None = None,
    *,
    min_lines: int = 2,
    min_doc_chars: int = 24,
    max_doc_chars: int = 400,
    modules: Sequence[str] = STDLIB_MODULES,
) -> list[TaskRecord]:
    """Mine docstring -> function records from the standard library.

    Args:
        max_lines: Longest function body kept, in non-blank lines after the docstring
            (signature excluded).  Short functions suit small models and 256-token budgets.
        seed: If given, return the records in a reproducible shuffled order; otherwise in
            module order, then source order.
        min_lines: Shortest body kept (filters ``raise NotImplementedError`` stubs).
        min_doc_chars: Shortest docstring summary (first paragraph) kept.
        max_doc_chars: Longest docstring summary kept.
        modules: Dotted stdlib module names to read (default :data:`STDLIB_MODULES`).

    Returns:
        One :class:`TaskRecord` per function: ``uid`` ``"stdlib/<module>.<qualname>"``,
        ``meta`` with ``module``, ``name``, ``qualname``, ``class_name``, ``lineno``,
        ``body_lines``.  Records with a duplicate prompt or reference are dropped (the
        first occurrence in module order wins).
    """
    if min_lines < 1 or max_lines < min_lines:
        raise ValueError(f"need 1 <= min_lines <= max_lines, got {min_lines}, {max_lines}")
    root = stdlib_dir()
    records: list[TaskRecord] = []
    seen: set[str] = set()
    for module in modules:
        path = module_path(module, root)
        if path is None:
            logger.debug("stdlib module %s not found under %s; skipped", module, root)
            continue
        for cand in _scan_module(module, str(path)):
            doc_len = len(cand.summary)
            if not (min_lines <= cand.body_lines <= max_lines):
                continue
            if not (min_doc_chars <= doc_len <= max_doc_chars) or len(cand.summary.split()) < 4:
                continue
            if "deprecated" in cand.summary.lower():
                continue
            prompt = _prompt(cand)
            if prompt in seen or cand.source in seen:
                continue
            seen.update((prompt, cand.source))
            records.append(
                TaskRecord(
                    uid=f"stdlib/{module}.{cand.qualname}",
                    prompt=prompt,
                    reference=cand.source,
                    meta={
                        "module": module,
                        "name": cand.name,
                        "qualname": cand.qualname,
                        "class_name": cand.class_name,
                        "lineno": cand.lineno,
                        "body_lines": cand.body_lines,
                    },
                )
            )
    logger.info(
        "mined %d stdlib functions from %d modules",
        len(records),
        len({r.meta["module"] for r in records}),
    )
    if seed is not None:
        records = seeded_order(records, [r.uid for r in records], seed)
    return records


def split_by_module(
    records: Sequence[TaskRecord], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """Hold out whole modules so that eval functions come from modules unseen in training.

    Modules are visited in ``stable_fraction(module, seed)`` order and moved to eval while
    that keeps the eval count at most ``eval_fraction * len(records)`` (a module that would
    overshoot is skipped, a later smaller one may still fit).  When ``eval_fraction > 0``
    at least one module is held out, and at least one module always stays in training.
    Both splits keep the input order.
    """
    check_fraction(eval_fraction)
    counts = Counter(r.meta["module"] for r in records)
    target = eval_fraction * len(records)
    order = sorted(counts, key=lambda m: (stable_fraction(m, seed), m))
    held: set[str] = set()
    n_eval = 0
    for module in order[:-1]:  # the last module in hash order always trains
        if n_eval + counts[module] <= target:
            held.add(module)
            n_eval += counts[module]
    if not held and eval_fraction > 0 and len(order) >= 2:
        held.add(min(order[:-1], key=lambda m: (counts[m], order.index(m))))
    train = [r for r in records if r.meta["module"] not in held]
    held_out = [r for r in records if r.meta["module"] in held]
    return train, held_out
