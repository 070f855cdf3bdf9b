"""Per-phase step timings (``time/*`` metrics): the union arithmetic behind "time inside
actors" and the keys and bounds of what a step logs (values, never durations)."""

from __future__ import annotations

import math

from raykd.algorithms.common import StepTimer, _union_seconds


class FakeGroup:
    """The busy-interval and restart-count side of a RoleGroup, advanced by hand."""

    def __init__(self, name: str = "fake"):
        self.name = name
        self.busy, self.total = [], 0
        self.restarts = 0  # actors replaced so far

    def add(self, begin, end):
        self.busy.append((begin, end))
        self.total += 1

    def busy_mark(self):
        return self.total

    def busy_since(self, mark):
        n = self.total - mark
        return self.busy[len(self.busy) - n :] if n else []


def test_union_of_overlapping_and_disjoint_intervals_clipped_to_the_window():
    assert _union_seconds([], 0.0, 10.0) == 0.0
    assert _union_seconds([(1.0, 3.0), (2.0, 4.0)], 0.0, 10.0) == 3.0  # overlap counted once
    assert _union_seconds([(5.0, 6.0), (1.0, 2.0)], 0.0, 10.0) == 2.0  # any order
    assert _union_seconds([(-5.0, 1.0), (9.0, 20.0)], 0.0, 10.0) == 2.0  # clipped
    assert _union_seconds([(1.0, 9.0), (2.0, 3.0)], 0.0, 10.0) == 8.0  # nested


def test_step_timer_keys_and_bounds():
    timer = StepTimer()
    a, b = FakeGroup("rollout"), FakeGroup("learner")
    with timer.phase("sampling", a):
        a.restarts += 1  # one of its actors replaced inside the phase
    with timer.phase("sampling", a):
        pass  # no call collected: all of the wait is overhead
    with timer.phase("scoring", teacher_scoring=a, old_logprobs=b):
        a.add(0.0, 1e12)  # a call spanning the whole phase: no overhead from this phase
    with timer.phase("controller_work"):  # no groups: not Ray overhead
        pass
    with timer.phase("sampling", a):  # a phase met twice adds up
        pass
    m = timer.metrics()
    for key in ("sampling", "scoring", "teacher_scoring", "old_logprobs", "controller_work",
                "ray_overhead", "controller", "step"):  # fmt: skip
        assert math.isfinite(m[f"time/{key}"]) and m[f"time/{key}"] >= 0.0, key
    assert m["time/old_logprobs"] == 0.0  # b made no call
    assert m["time/teacher_scoring"] <= m["time/scoring"]
    assert m["time/ray_overhead"] <= m["time/sampling"] + 1e-9  # scoring added nothing
    phases = m["time/sampling"] + m["time/scoring"] + m["time/controller_work"]
    assert phases <= m["time/step"] + 1e-9
    assert abs(m["time/controller"] - (m["time/step"] - phases)) < 1e-3
    # a replacement shows in the step's metrics, only for the group it happened in
    assert m["restarts/rollout"] == 1.0 and "restarts/learner" not in m
