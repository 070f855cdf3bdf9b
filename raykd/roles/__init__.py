"""Ray roles: rollout workers, teacher scorers, DeepSpeed learners, and the group helper.

Each role is a plain class (importable and unit-testable without Ray) turned into an actor by
:class:`raykd.roles.group.RoleGroup`.
"""

from raykd.roles.group import RoleGroup, shard
from raykd.roles.learner import Learner
from raykd.roles.rollout import RolloutWorker
from raykd.roles.runtime import init_ray
from raykd.roles.teacher import TeacherScorer

__all__ = ["Learner", "RoleGroup", "RolloutWorker", "TeacherScorer", "init_ray", "shard"]
