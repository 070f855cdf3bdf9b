"""Training algorithms, one module each, registered by the name a config's
``pipeline.train`` list uses.

* ``sft``        — supervised fine-tuning on dataset responses (``supervised.py``)
* ``word_kd``    — off-policy word-level KD with cached teacher top-k targets (``word_kd.py``)
* ``dense_kd``   — off-policy KD on full logits of colocated teacher(s) (``dense_kd.py``)
* ``reverse_kl`` — on-policy reverse KL, MiniLLM policy gradient (``onpolicy.py``)
* ``seqkd``      — sequence-level KD / SCoTD on N teacher samples per prompt (``seqkd.py``)
* ``gkd``        — generalized KD: JSD(β) on mixed on-/off-policy responses (``gkd.py``)
* ``grpo``       — GRPO with rule-based rewards (``grpo.py``, rewards in ``raykd.rewards``)

Each entry is ``run(ctx: StageContext) -> summary dict``. Modules are imported lazily so that
loading a config does not import torch-heavy code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

ALGORITHMS: dict[str, str] = {
    "sft": "raykd.algorithms.supervised",
    "word_kd": "raykd.algorithms.word_kd",
    "dense_kd": "raykd.algorithms.dense_kd",
    "reverse_kl": "raykd.algorithms.onpolicy",
    "seqkd": "raykd.algorithms.seqkd",
    "gkd": "raykd.algorithms.gkd",
    "grpo": "raykd.algorithms.grpo",
}


def get_algorithm(name: str) -> Callable:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[name]).run
