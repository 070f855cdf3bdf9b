"""Tasks for distillation: text records, chat tokenisation and train/eval splits.

Typical use::

    from raykd.data import load_task

    data = load_task("stdlib_code", tokenizer, max_length=256)
    data.train, data.eval, data.kind, data.stats
"""

from raykd.data.dolly import DollyFormatError, dolly_prompt, load_dolly
from raykd.data.files import MAX_LINE_BYTES, DataFileError, read_lines
from raykd.data.formatting import encode_example, encode_records, end_of_turn_id, prompt_only
from raykd.data.records import TaskData, TaskKind, TaskRecord
from raykd.data.split import split_by_uid, stable_fraction
from raykd.data.stdlib_code import STDLIB_MODULES, mine_stdlib_functions, split_by_module
from raykd.data.tasks import TASKS, EmptyDatasetError, TaskSpec, load_task, register_task

__all__ = [
    "MAX_LINE_BYTES",
    "STDLIB_MODULES",
    "TASKS",
    "DataFileError",
    "DollyFormatError",
    "EmptyDatasetError",
    "TaskData",
    "TaskKind",
    "TaskRecord",
    "TaskSpec",
    "dolly_prompt",
    "encode_example",
    "encode_records",
    "end_of_turn_id",
    "load_dolly",
    "load_task",
    "mine_stdlib_functions",
    "prompt_only",
    "read_lines",
    "register_task",
    "split_by_module",
    "split_by_uid",
    "stable_fraction",
]
