"""GRPO with the execution reward and the teacher log-prob term, end to end through real roles:
the values the stage logs are the sandbox's verdicts on the texts the student sampled, plus
the teacher's mean log-prob of those texts; evaluation reports pass@1 by execution."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from raykd.batch import Example
from raykd.data import TASKS, TaskSpec
from raykd.data.records import TaskRecord
from raykd.evaluate.metrics import clean_stop
from raykd.pipeline.run import run_pipeline
from raykd.rewards import get_reward

from .conftest import run_dir_of, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

WEIGHT = 0.05  # grpo.teacher_logprob_weight


def _records() -> list[TaskRecord]:
    """Eight tiny problems whose reference answer is ``x=1`` (3 bytes: a byte-level model
    learns it in a few SFT steps); the odd ones' tests want ``x == 2``, so that answer passes
    both tests of an even problem (reward 1) and one of two of an odd one (reward 0.5)."""
    return [TaskRecord(uid=f"x/{i}", prompt=f"Set x ({i}).", reference="x=1",
                       meta={"tests": [f"assert x == {1 + i % 2}", "assert isinstance(x, int)"],
                             "format": "code"}) for i in range(8)]  # fmt: skip


def _build(path, eval_fraction, seed):
    from raykd.data.split import split_by_uid

    train, held = split_by_uid(_records(), eval_fraction, seed)
    return train, held, {}


def _build_eval(path, eval_fraction, seed):
    """An eval-only task (as HumanEval is): two problems, uids of their own."""
    held = [TaskRecord(f"e/{r.uid}", r.prompt, r.reference, r.meta) for r in _records()[:2]]
    return [], held, {}


def test_grpo_execution_reward_values_cross_the_roles(ray_node, tiny_teacher, tmp_path,
                                                      monkeypatch):  # fmt: skip
    monkeypatch.setitem(TASKS, "x_is_one", TaskSpec(kind="code", build=_build))
    monkeypatch.setitem(TASKS, "x_eval", TaskSpec(kind="code", build=_build_eval))
    steps, group = 3, 4
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        "data.task=x_is_one",
        "data.path=null",
        "data.eval_task=x_eval",  # held out on another task
        "pipeline.eval_teacher=false",
        "pipeline.eval_student_before=false",
        "pipeline.train=[sft,grpo]",
        "sft.steps=30",
        f"grpo.steps={steps}",
        "grpo.prompts_per_step=2",
        f"grpo.group_size={group}",
        "grpo.rewards=[execution]",
        "grpo.reward_kwargs={execution: {timeout: 5.0}}",
        "grpo.reward_tasks=1",  # the reward runs as a Ray task
        "grpo.reward_cpus_per_task=0.25",
        f"grpo.teacher_logprob_weight={WEIGHT}",
        "grpo.lr=1e-3",
        "rollout.max_new_tokens=6",
        "eval.max_new_tokens=6",
        "eval.humaneval=true",  # every model also on (4 of) HumanEval's problems
        "eval.humaneval_problems=4",
        "eval.humaneval_max_new_tokens=8",
    )
    results = run_pipeline(cfg)
    run_dir = run_dir_of(results)
    rows = [json.loads(x) for x in (run_dir / "data" / "2-grpo-completions.jsonl").read_text()
            .splitlines()]  # fmt: skip
    assert [r["step"] for r in rows] == [s for s in range(1, steps + 1) for _ in range(2 * group)]

    # the logged execution reward of each sampled text is the sandbox's verdict on that text
    meta = {r.uid: r.meta for r in _records()}
    exs = [Example(r["uid"], [], [], meta=meta[r["uid"]]) for r in rows]
    fresh = get_reward("execution", timeout=5.0)(exs, [r["completion"] for r in rows])
    assert [r["execution"] for r in rows] == fresh
    # after SFT the student writes x=1: 1.0 on even problems, 0.5 on odd ones
    assert {0.5, 1.0} <= set(fresh), [(r["uid"], r["completion"]) for r in rows]
    # total = execution + w * mean log p_T over the response tokens (<= 0)
    for r in rows:
        assert r["teacher_logprob"] <= 0 and math.isfinite(r["teacher_logprob"])
        assert r["reward"] == pytest.approx(r["execution"] + WEIGHT * r["teacher_logprob"],
                                            abs=1e-5)  # fmt: skip

    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if m["stage"] == "2-grpo" and "reward" in m]
    assert len(logged) == steps
    for m in logged:
        mine = [r for r in rows if r["step"] == m["step"]]
        assert m["reward/execution"] == pytest.approx(
            statistics.fmean(r["execution"] for r in mine)
        )
        assert m["reward"] == pytest.approx(statistics.fmean(r["reward"] for r in mine), abs=1e-5)
        assert m["reward_seconds"] > 0

    summary = json.loads((run_dir / "stages" / "2-grpo.json").read_text())
    assert "seccomp" in summary["sandbox"] or "rlimits" in summary["sandbox"]

    # evaluation executes the held-out answers: pass@1 beside Rouge-L, in the report
    after = results["models"]["student_after"]
    assert after["num_with_tests"] == 2 and 0 <= after["pass_at_1"] <= 100
    assert "sampled_pass_at_1" in after  # tiny_config has eval.sample_seeds=[1]
    uids = [f"x/{s['prompt'].split('(')[1].split(')')[0]}" for s in after["samples"]]
    held = [Example(u, [], [], meta=meta[u]) for u in uids]  # in evaluation order
    verdicts = get_reward("execution", mode="all_or_nothing")(held, after["predictions"])
    assert after["pass_at_1"] == 100.0 * sum(verdicts) / 2
    data = json.loads((run_dir / "stages" / "data.json").read_text())
    assert data["eval"] == 2 and data["eval_task"]["task"] == "x_eval"
    report = (run_dir / "report.md").read_text()
    assert "pass@1" in report

    # the clean-stop verdicts are the metric's on the texts and stop flags the samplers sent
    assert len(after["stopped"]) == len(after["predictions"]) == 2
    names = [meta[u].get("name") for u in uids]
    want = [clean_stop(p, n, s) for p, n, s in zip(after["predictions"], names, after["stopped"])]
    assert [e["clean_stop"] for e in after["per_example"]] == want
    assert after["clean_stop_rate"] == 100.0 * sum(want) / 2
    # the stub row: the requested "signature" + pass, valid and clean, and it passes nothing
    stub = results["models"]["stub"]
    assert stub["predictions"] == ["def solution():\n    pass"] * 2
    assert stub["clean_stop_rate"] == 100.0 and stub["pass_at_1"] == 0.0
    # HumanEval beside the task, for the student and the stub: 4 problems, run in the sandbox
    for row in (after, stub):
        assert row["humaneval"]["num_examples"] == 4
        assert 0.0 <= row["humaneval"]["pass_at_1"] <= 100.0
    assert stub["humaneval"]["pass_at_1"] == 0.0
    assert "HumanEval pass@1" in report and "| stub |" in report and "clean stop" in report
