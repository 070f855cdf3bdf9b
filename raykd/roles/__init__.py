"""Ray roles: samplers (rollout workers), scorers (teachers), DeepSpeed learners, the group
helper that places and fans out to them, weight sync, and rewards as Ray tasks.

Only this package talks to Ray. Each role is a plain class (importable and unit-testable
without Ray) turned into actors by :class:`raykd.roles.group.RoleGroup`. Backends of the
sampler and scorer interfaces are registered in :mod:`raykd.roles.backends`. Names are
imported lazily so that loading a config (which checks backend names) does not import Ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Learner": "raykd.roles.learner",
    "LearnerGroup": "raykd.roles.factory",
    "Placement": "raykd.roles.group",
    "RoleGroup": "raykd.roles.group",
    "RolloutWorker": "raykd.roles.rollout",
    "Sampler": "raykd.roles.backends",
    "Scorer": "raykd.roles.backends",
    "SlotPlacement": "raykd.roles.factory",
    "TeacherScorer": "raykd.roles.teacher",
    "init_ray": "raykd.roles.runtime",
    "shard": "raykd.roles.group",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raykd.roles' has no attribute {name!r}")
