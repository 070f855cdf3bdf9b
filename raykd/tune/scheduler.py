"""ASHA per group: trials compete only with trials of their own task/language.

Held-out cross-entropy on English Dolly and on Python code are not comparable numbers, so a
sweep across tasks must not stop a code trial because English trials reached a lower loss.
:class:`GroupedASHA` is Ray Tune's ASHA with one set of rungs per group (the trial's value of
the sweep's ``group_by``, :func:`raykd.tune.trial.group_of_config`); within a group it decides
exactly as ``ASHAScheduler`` does.
"""

from __future__ import annotations

import copy

from ray.tune.schedulers import ASHAScheduler

from raykd.tune.trial import group_of_config


class GroupedASHA(ASHAScheduler):
    """``ASHAScheduler`` whose brackets (rungs and the results recorded at them) are kept per
    group of trials; arguments as ``ASHAScheduler``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._empty = copy.deepcopy(self._brackets)  # the rungs, nothing recorded yet
        self._group_brackets: dict[str, list] = {}

    def on_trial_add(self, tune_controller, trial) -> None:
        group = group_of_config(trial.config)
        if group not in self._group_brackets:
            self._group_brackets[group] = copy.deepcopy(self._empty)
        self._brackets = self._group_brackets[group]  # the parent picks one of these
        super().on_trial_add(tune_controller, trial)

    def debug_string(self) -> str:
        return f"GroupedASHA: {len(self._group_brackets)} groups, {self._num_stopped} stopped"
