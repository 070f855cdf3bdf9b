"""The package_code task (raykd.data.package_code, raykd.data.dedup) on synthetic site-packages."""

from __future__ import annotations

import textwrap

import pytest

from raykd.data import load_task
from raykd.data.dedup import NearDuplicateIndex, code_tokens, shingles
from raykd.data.package_code import (
    build_package_code,
    mine_package_functions,
    remove_near_duplicates,
)
from raykd.data.records import TaskRecord
from raykd.data.stdlib_code import mine_stdlib_functions, split_by_module
from raykd.models.tiny import build_tiny_tokenizer

GOOD = '''
def scale(values, factor=2):
    """Multiply every value in the list by the given factor and return a new list."""
    out = [v * factor for v in values]
    return out


class Box:
    def volume(self, w, h, d):
        """Return the volume of a box with the given width, height and depth."""
        v = w * h * d
        return v
'''


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")


def _function(name, doc, body):
    return f'def {name}(x):\n    """{doc}"""\n' + textwrap.indent(body, "    ") + "\n"


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "site-packages"
    _write(root, "alpha/__init__.py", GOOD)
    _write(root, "alpha/tests/test_core.py", _function("helper", "A helper in a tests folder here.",
                                                          "y = x\nreturn y"))  # fmt: skip
    _write(root, "alpha/_vendor/six.py", _function("vendored", "A vendored copy of some code.",
                                                     "y = x\nreturn y"))  # fmt: skip
    _write(root, "alpha/test_things.py", _function("in_test_file", "Defined in a test file, so skipped.",
                                                     "y = x\nreturn y"))  # fmt: skip
    _write(root, "beta/broken.py", "def oops(:\n    pass\n")
    (root / "beta" / "latin.py").write_bytes(b"# \xe9\xe8\ndef f():\n    pass\n")
    _write(root, "beta/tools.py", _function("double_it", "Return twice the given number x here.",
                                            "y = x + x\nreturn y"))  # fmt: skip
    _write(root, "backports/tarfile/__init__.py", _function("open_it", "Open the tar archive named x.",
                                                              "y = x\nreturn y"))  # fmt: skip
    _write(root, "gamma-1.0.dist-info/meta.py", _function("meta", "Metadata helper is not code.",
                                                         "y = x\nreturn y"))  # fmt: skip
    _write(root, "solo.py", _function("triple", "Return three times the given number x.",
                                      "y = x * 3\nreturn y"))  # fmt: skip
    return root


def test_mining_skips_tests_vendored_metadata_and_counts_errors(tree):
    records, stats = mine_package_functions([tree], exclude_modules=["tarfile"])
    assert [r.uid for r in records] == [
        "pkg/alpha.scale", "pkg/alpha.Box.volume", "pkg/beta.tools.double_it", "pkg/solo.triple",
    ]  # fmt: skip
    scale = records[0]
    assert scale.prompt == (
        "Write a Python function `scale(values, factor=2)` that: Multiply every value in the "
        "list by the given factor and return a new list."
    )
    assert scale.reference == "def scale(values, factor=2):\n    out = [v * factor for v in values]\n    return out"  # fmt: skip
    assert scale.meta["package"] == "alpha" and scale.meta["source"] == "site-packages"
    assert stats["parse_errors"] == 1 and stats["files_not_utf8"] == 1
    assert stats["files_held_out"] == 1  # backports.tarfile
    assert stats["files_skipped_tests"] == 1 and stats["dirs_skipped"] == 2  # tests/, _vendor/
    assert stats["packages"] == 4  # alpha, backports, beta, solo.py (not the dist-info)
    assert stats["records"] == 4 and stats["per_package"] == {"alpha": 2, "beta": 1, "solo": 1}
    again, _ = mine_package_functions([tree], exclude_modules=["tarfile"])
    assert [r.uid for r in again] == [r.uid for r in records]  # deterministic
    unexcluded, _ = mine_package_functions([tree])
    assert "pkg/backports.tarfile.open_it" in {r.uid for r in unexcluded}


def test_mining_caps(tree):
    records, stats = mine_package_functions([tree], max_per_package=1)
    assert [r.meta["package"] for r in records] == ["alpha", "backports", "beta", "solo"]
    assert stats["functions_over_cap"] == 1 and stats["files_over_cap"] == 0
    records, _ = mine_package_functions([tree], max_records=2)
    assert len(records) == 2
    records, stats = mine_package_functions([tree], max_files_per_package=0)
    assert records == [] and stats["files_over_cap"] >= 5


def test_near_duplicate_rules():
    original = "def total(items):\n    s = 0\n    for it in items:\n        s += it.price * 2\n    return s"
    edited = "def total(items):\n    s = 0\n    for it in items:\n        s += it.price * 3\n    return s  # x"  # fmt: skip
    renamed = "def total(xs):\n    acc = 0\n    for x in xs:\n        acc += x.cost * 2\n    return acc"  # fmt: skip
    other = "def parse(text):\n    head, _, tail = text.partition(':')\n    return head.strip()"
    assert code_tokens("x = 'a' + 12  # c\n") == ["x", "=", "<str>", "+", "<num>"]
    a, b = shingles(code_tokens(original)), shingles(code_tokens(edited))
    index = NearDuplicateIndex([original], ["total"], threshold=0.7)
    assert index.match(edited, "total").kind == "shingles"  # 1 number differs: <num> is <num>
    assert index.match(edited, "total").similarity == pytest.approx(len(a & b) / len(a | b))
    assert index.match(renamed, "total").kind == "renamed"
    assert index.match(renamed, "summe") is None  # renamed, but another name: not flagged
    assert index.match(other, "parse") is None
    strict = NearDuplicateIndex([original], ["total"], threshold=1.0)
    body_change = original.replace("* 2", "* it.qty")
    assert strict.match(body_change, "other") is None


def test_remove_near_duplicates_drops_copies_of_eval_functions():
    held = [
        TaskRecord(
            "stdlib/m.total",
            "p0",
            "def total(items):\n    s = 0\n    for it in items:\n        s += it.price\n    return s",  # fmt: skip
            {"name": "total"},
        )
    ]
    train = [
        TaskRecord("pkg/a.total", "p1", "def total(items):\n    s = 0\n    for it in items:\n        s += it.price  # sum\n    return s",  # fmt: skip
                   {"name": "total"}),
        TaskRecord("pkg/a.keep", "p2", "def keep(x):\n    return [v for v in x if v]", {"name": "keep"}),
        TaskRecord("pkg/b.keep", "p2", "def keep(y):\n    return list(filter(None, y))", {"name": "keep"}),
    ]  # fmt: skip
    kept, stats = remove_near_duplicates(train, held)
    assert [r.uid for r in kept] == ["pkg/a.keep"]
    assert stats["near_duplicates_shingles"] == 1 and stats["exact_duplicates"] == 1
    assert stats["examples"][0]["eval_uid"] == "stdlib/m.total"


def test_package_code_task_keeps_the_stdlib_eval_split_and_drops_copies(tree):
    stdlib_train, stdlib_eval = split_by_module(mine_stdlib_functions(), 0.2, 0)
    victim = stdlib_eval[0]  # a held-out stdlib function copied (comment added) into a package
    body = victim.reference.replace("\n", "  # copied\n", 1)
    doc = "A copy of a held-out function with a docstring long enough."
    header, rest = body.split("\n", 1)
    _write(tree, "delta/copy.py", f'{header}\n    """{doc}"""\n{rest}\n')
    train, held_out, stats = build_package_code(tree, 0.2, 0)
    assert [r.uid for r in held_out] == [r.uid for r in stdlib_eval]
    uids = {r.uid for r in train}
    assert f"pkg/delta.copy.{victim.meta['name']}" not in uids
    assert (
        stats["dedup"]["near_duplicates_shingles"] + stats["dedup"]["near_duplicates_renamed"] >= 1
    )
    assert {"pkg/alpha.scale", "pkg/beta.tools.double_it"} <= uids
    assert stats["train_packages"] == 5 and stats["train_stdlib"] <= len(stdlib_train)
    assert stats["eval_modules"] == sorted({r.meta["module"] for r in stdlib_eval})
    assert stats["mined"]["parse_errors"] == 1


def test_load_task_package_code_reports_stats(tree):
    data = load_task("package_code", build_tiny_tokenizer(), path=tree, max_length=512,
                     num_eval=8)  # fmt: skip
    assert data.kind == "code" and len(data.eval) == 8
    assert data.stats["mined"]["records"] == 5 and data.stats["train_packages"] == 5
    assert data.stats["found_train"] == data.stats["train_stdlib"] + 5
