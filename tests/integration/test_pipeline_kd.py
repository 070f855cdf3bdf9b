"""Off-policy word-level KD end to end: real Ray actors, real DeepSpeed (gloo), tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from topk_checks import assert_same_topk
from transformers import AutoModelForCausalLM

from raykd.batch import examples_to_batch
from raykd.data import load_task
from raykd.models import load_tokenizer
from raykd.pipeline.run import run_pipeline
from raykd.roles.target_cache import TopKCache
from raykd.roles.teacher import TeacherScorer

from .conftest import run_dir_of, tiny_config

pytestmark = pytest.mark.integration


def _losses(run_dir, stage):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "loss" in r]


def test_word_kd_overfits_caches_targets_and_reports(ray_node, tiny_teacher, tmp_path):
    kd = ("pipeline.train=[word_kd]", "word_kd.alpha=0.9", "word_kd.temperature=2.0")
    cfg = tiny_config(tmp_path, tiny_teacher, *kd, "word_kd.steps=8")
    run_dir = run_dir_of(run_pipeline(cfg))

    # the loss on the 4-example overfit set falls (every step sees the same 4 examples)
    rows = _losses(run_dir, "1-word_kd")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert rows[-1]["kd"] < 0.7 * rows[0]["kd"]

    # teacher targets: scored once per training example, then served from the cache
    stage0 = json.loads((run_dir / "stages" / "1-word_kd.json").read_text())
    assert stage0["teacher_targets"]["scored"] == 4
    # (a different run, same teacher, data, k and temperature)
    again = run_dir_of(
        run_pipeline(tiny_config(tmp_path, tiny_teacher, *kd, "word_kd.steps=1", "run.name=t2"))
    )
    stage1 = json.loads((again / "stages" / "1-word_kd.json").read_text())
    assert stage1["teacher_targets"] == {"cached": 4, "scored": 0, "seconds": 0.0}

    # the run directory holds the resolved config, eval results, final model and report
    assert "word_kd" in (run_dir / "config.yaml").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    models = report["models"]
    assert set(models) >= {"teacher", "student_before", "student_after"}
    for name in ("teacher", "student_before", "student_after"):
        assert 0.0 <= models[name]["rouge_l"] <= 100.0
    assert (run_dir / "report.md").read_text().count("student_after") >= 1
    assert (run_dir / "report.png").stat().st_size > 1000

    # the exported student reloads with transformers and is the 2-layer derived model
    final = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "final")
    assert final.config.num_hidden_layers == 2
    init = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "student_init")
    moved = [
        not torch.equal(a, b)
        for (_, a), (_, b) in zip(final.named_parameters(), init.named_parameters())
    ]
    assert any(moved)


def test_prefetched_targets_match_upfront_ones_and_score_only_what_is_used(
    ray_node, tiny_teacher, tmp_path
):
    """teacher.prefetch_steps: the teacher scores batches ahead of the learner instead of the
    whole split first; training sees the same targets, and unused examples are never scored.
    Both modes' cached targets equal a direct, unbatched teacher call (at tau = 2)."""
    args = ("pipeline.train=[word_kd]", "word_kd.steps=2", "data.num_train=8",
            "word_kd.temperature=2.0",
            "learner.micro_batch_size=2", "pipeline.eval_teacher=false",
            "pipeline.eval_student_before=false", "teacher.batch_size=2")  # fmt: skip
    runs = {}
    for mode, extra in (("upfront", "teacher.prefetch_steps=0"), ("ahead", "teacher.prefetch_steps=2")):  # fmt: skip
        cfg = tiny_config(tmp_path, tiny_teacher, *args, extra, f"run.name={mode}",
                          f"teacher.cache_dir={tmp_path / ('cache_' + mode)}")  # fmt: skip
        run_dir = run_dir_of(run_pipeline(cfg))
        stage = json.loads((run_dir / "stages" / "1-word_kd.json").read_text())
        runs[mode] = (_losses(run_dir, "1-word_kd"), stage["teacher_targets"])
    (up_rows, up_stats), (ahead_rows, ahead_stats) = runs["upfront"], runs["ahead"]
    # identical training: same targets reach the learner in the same order
    assert [r["loss"] for r in ahead_rows] == pytest.approx([r["loss"] for r in up_rows], abs=1e-6)
    assert all("teacher_wait_seconds" in r for r in ahead_rows)
    # upfront scores the whole train split (6 of the fixture's 8); ahead only the 2 steps x 2
    # examples trained on (one epoch's permutation: 4 distinct)
    n_train = up_stats["scored"]
    assert n_train == 6 and ahead_stats["scored"] == 4
    assert len(list((tmp_path / "cache_ahead").rglob("*.pt"))) == ahead_stats["scored"]
    assert len(list((tmp_path / "cache_upfront").rglob("*.pt"))) == n_train

    # The targets are the teacher's: both modes score through the same prefetcher, so they
    # must also match targets computed independently -- a direct TeacherScorer call per
    # example, unbatched, on the train split the pipeline builds.
    dc = cfg.data
    task = load_task(dc.task, load_tokenizer(tiny_teacher), path=dc.path,
                     max_length=dc.max_length, num_train=dc.num_train, num_eval=dc.num_eval,
                     eval_fraction=dc.eval_fraction, seed=cfg.run.seed,
                     system_prompt=dc.system_prompt)  # fmt: skip
    scorer = TeacherScorer(tiny_teacher)
    k, tau = cfg.teacher.top_k, cfg.word_kd.temperature
    for mode, expected in (("upfront", n_train), ("ahead", ahead_stats["scored"])):
        cache = TopKCache(tmp_path / f"cache_{mode}", tiny_teacher, k, tau)
        checked = 0
        for ex in task.train:
            got = cache.get(ex)
            if got is None:
                continue
            [(want_lp, want_idx)] = scorer.topk_targets(examples_to_batch([ex], 0), k, tau)
            assert_same_topk(got[0], got[1], want_lp, want_idx, (mode, ex.uid))
            checked += 1
        assert checked == expected, mode  # every cached entry was checked
