"""When the on-policy stage recomputes log q_old beside teacher scoring: only where the node's
CPUs cover both roles' torch threads (or on a cluster, where they have their own)."""

from __future__ import annotations

from pathlib import Path

from raykd.algorithms.onpolicy import scoring_side_by_side
from raykd.config import load_config

QUICKSTART = Path(__file__).resolve().parents[2] / "conf" / "quickstart.yaml"


def test_side_by_side_only_when_the_threads_fit():
    # the quickstart: a 2-thread teacher and a 2-thread learner
    assert not scoring_side_by_side(load_config(QUICKSTART, ["ray.num_cpus=2"]))
    assert not scoring_side_by_side(load_config(QUICKSTART, ["ray.num_cpus=3"]))
    assert scoring_side_by_side(load_config(QUICKSTART, ["ray.num_cpus=4"]))
    one = ["ray.num_cpus=2", "teacher.num_threads=1", "learner.num_threads=1"]
    assert scoring_side_by_side(load_config(QUICKSTART, one))
    two_ranks = [*one, "learner.num_ranks=2"]  # 1 + 2 x 1 threads on 2 CPUs
    assert not scoring_side_by_side(load_config(QUICKSTART, two_ranks))
    assert scoring_side_by_side(load_config(QUICKSTART, ["ray.num_cpus=2", "ray.address=auto"]))
