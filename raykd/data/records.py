"""Task-neutral records: the text of a task before and after tokenisation.

A loader turns a source (the Python standard library, a Dolly JSONL file, ...) into
:class:`TaskRecord` objects — plain strings, no tokenizer involved.  :mod:`raykd.data.formatting`
then turns records into :class:`raykd.batch.Example` objects for a given tokenizer, and
:func:`raykd.data.load_task` bundles the train and eval examples into a :class:`TaskData`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raykd.batch import Example

TaskKind = Literal["code", "text"]


@dataclass
class TaskRecord:
    """One prompt/reference pair of a task, as text.

    Attributes:
        uid: Stable identifier, unique within the task (e.g. ``"stdlib/shlex.quote"``).
        prompt: The user turn shown to the model.
        reference: The expected assistant answer (what the student is trained to produce).
        meta: Free-form, JSON-serialisable provenance (module, function name, category, ...).
    """

    uid: str
    prompt: str
    reference: str
    meta: dict = field(default_factory=dict)


@dataclass
class TaskData:
    """Tokenised train and eval examples of one task plus bookkeeping.

    Attributes:
        train: Training examples.
        eval: Held-out evaluation examples (never overlapping ``train``).
        kind: ``"code"`` (predictions are scored for parseability too) or ``"text"``.
        stats: Counts of records found, dropped as too long, kept per split, and
            task-specific details; JSON-serialisable.
    """

    train: list[Example]
    eval: list[Example]
    kind: TaskKind
    stats: dict = field(default_factory=dict)
