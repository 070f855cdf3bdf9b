"""The sweep's parts without a Ray node: the summary from trial records, ASHA per group, the
trial reporter (global steps, no step reported twice), Dolly by hub name, and the language
sweep resolving to real configs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from raykd.tune.summary import best_per_group, build_summary, summary_markdown, write_summary

REPO = Path(__file__).resolve().parents[2]
SPEC = {"name": "s", "metric": "heldout_ce", "mode": "min", "rank_by": "rouge_l",
        "rank_mode": "max", "group_by": "language", "eval_every": 2, "scheduler": "asha"}  # fmt: skip


def record(tid, group, status, metric, rank, **params):
    history = [[2, metric + 1.0], [4, metric]] if metric is not None else []
    final = {"rouge_l": rank, "rouge_l/open_qa": rank} if rank is not None else {}
    return {"trial_id": tid, "run_name": f"{group}-{tid}", "run_dir": f"runs/{tid}",
            "group": group, "params": {**params, "language": group}, "status": status,
            "metric": metric, "rank": rank, "global_step": 4 if metric else 0,
            "reports": len(history), "wall_seconds": 12.5, "final": final, "history": history,
            "error": "RuntimeError: boom" if status == "error" else None}  # fmt: skip


RECORDS = [
    record("t0", "en", "completed", 2.0, 30.0, lr=0.01),
    record("t1", "en", "completed", 1.5, 35.5, lr=0.001),
    record("t2", "en", "stopped", 3.0, None, lr=1e-5),
    record("t3", "code", "stopped", 4.0, None, lr=0.01),
    record("t4", "code", "stopped", 2.5, None, lr=0.001),
    record("t5", "es", "error", None, None, lr=0.01),
]


def test_best_per_group_ranks_by_the_final_metric_then_falls_back_to_the_training_one():
    best = best_per_group(RECORDS, "min", "max")
    assert best["en"] == {"trial_id": "t1", "by": "rank", "value": 35.5,
                          "params": {"lr": 0.001, "language": "en"}, "run_dir": "runs/t1"}  # fmt: skip
    assert best["code"]["trial_id"] == "t4" and best["code"]["by"] == "metric"
    assert best["code"]["value"] == 2.5
    assert "es" not in best  # its only trial failed


def test_summary_files_hold_the_values(tmp_path):
    summary = build_summary(RECORDS, SPEC)
    assert summary["counts"] == {"completed": 2, "stopped": 3, "error": 1}
    files = write_summary(summary, tmp_path)
    assert json.loads(Path(files["json"]).read_text()) == summary
    md = Path(files["md"]).read_text()
    assert "6 trials (2 completed, 1 error, 3 stopped)" in md
    assert "| en | t1 | rouge_l | 35.5 | lr=0.001, language=en |" in md
    assert "| code | t4 | heldout_ce | 2.5 | lr=0.001, language=code |" in md
    assert "| t2 | en | 1e-05 | stopped | 3 | – | – | 4 | 12.5 |" in md
    assert "- t5: RuntimeError: boom" in md
    assert "| trial | open_qa |" in md and "| t1 | 35.5 |" in md
    assert "![heldout_ce per trial](summary.png)" in md
    assert Path(files["png"]).stat().st_size > 5000
    assert summary_markdown(summary, None).count("summary.png") == 0


def fake_trial(tid, group):
    return SimpleNamespace(trial_id=tid, config={"setup": {"group_by": "language"},
                                                 "variants": {"language": group}})  # fmt: skip


def test_grouped_asha_compares_trials_only_within_their_group():
    from ray.tune.schedulers import TrialScheduler

    from raykd.tune.scheduler import GroupedASHA

    sched = GroupedASHA(time_attr="global_step", max_t=8, grace_period=2, reduction_factor=2,
                        stop_last_trials=False)  # fmt: skip
    sched.set_search_properties("heldout_ce", "min")
    en1, code1, en2, code2 = (fake_trial("a", "en"), fake_trial("b", "code"),
                              fake_trial("c", "en"), fake_trial("d", "code"))  # fmt: skip
    for t in (en1, code1, en2, code2):
        sched.on_trial_add(None, t)

    def result(trial, value):
        return sched.on_trial_result(None, trial, {"global_step": 2, "heldout_ce": value})

    assert result(en1, 1.0) == TrialScheduler.CONTINUE
    # code's CE is far above English's, but it is the first code trial at this rung
    assert result(code1, 5.0) == TrialScheduler.CONTINUE
    assert result(en2, 2.0) == TrialScheduler.STOP  # worse than en1
    assert result(code2, 4.0) == TrialScheduler.CONTINUE  # better than code1
    # plain ASHA would have stopped code2 against the English trials
    from ray.tune.schedulers import ASHAScheduler

    plain = ASHAScheduler(time_attr="global_step", max_t=8, grace_period=2, reduction_factor=2)
    plain.set_search_properties("heldout_ce", "min")
    for t in (en1, code2):
        plain.on_trial_add(None, t)
    plain.on_trial_result(None, en1, {"global_step": 2, "heldout_ce": 1.0})
    assert plain.on_trial_result(None, code2, {"global_step": 2, "heldout_ce": 4.0}) == "STOP"


def test_tune_reporter_counts_global_steps_and_skips_steps_tune_already_has():
    from raykd.config import load_config
    from raykd.tune.trial import TuneReporter

    cfg = load_config(None, ["pipeline.train=[sft,word_kd]", "sft.steps=4", "word_kd.steps=6"])
    sent = []
    rep = TuneReporter(cfg, 2, 3, {"global_step": 4, "metrics": {"heldout_ce": 9.0}}, "en")
    rep.report = sent.append
    assert (rep.eval_every, rep.eval_examples) == (2, 3)  # what StageContext.log asks for
    rep("1-sft", 4, 4, {"loss": 1.0, "heldout_ce": 3.0})  # reported before the restart
    rep("2-word_kd", 1, 6, {"loss": 0.9})  # no held-out eval at this step
    rep("2-word_kd", 2, 6, {"loss": 0.8, "heldout_ce": 2.5, "elapsed_seconds": 3.0})
    assert sent == [{"loss": 0.8, "heldout_ce": 2.5, "elapsed_seconds": 3.0,
                     "stage": "2-word_kd", "step": 2, "global_step": 6, "group": "en"}]  # fmt: skip
    assert rep.state() == {"global_step": 6, "metrics": sent[0], "reports": 1}


def test_dolly_loads_by_hub_name_with_category_kept(monkeypatch):
    import datasets

    from raykd.data.dolly import hub_name, load_dolly

    rows = [{"id": 7, "instruction": "¿Qué es Madrid?", "context": "", "response": "Una ciudad.",
             "category": "open_qa", "instruction_original_en": "What is Madrid?"},
            {"id": 9, "instruction": "Resume", "context": "Texto largo.", "response": "Corto.",
             "category": "summarization"}]  # fmt: skip
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    name = "hub:argilla/databricks-dolly-15k-curated-multilingual@es"
    assert hub_name(name) == ("argilla/databricks-dolly-15k-curated-multilingual", "es")
    assert hub_name("hub:databricks/databricks-dolly-15k") == (
        "databricks/databricks-dolly-15k", "train")  # fmt: skip
    assert hub_name("tests/fixtures/dolly_es.jsonl") is None
    recs = load_dolly(name)
    assert calls == [("argilla/databricks-dolly-15k-curated-multilingual", "es")]
    assert [r.uid for r in recs] == ["databricks-dolly-15k-curated-multilingual-es/7",
                                     "databricks-dolly-15k-curated-multilingual-es/9"]  # fmt: skip
    assert [r.meta["category"] for r in recs] == ["open_qa", "summarization"]
    assert recs[1].prompt == "Resume\n\nContext:\nTexto largo." and recs[1].reference == "Corto."


@pytest.mark.parametrize("name", ["languages.yaml", "languages_hub.yaml"])
def test_the_language_sweeps_resolve_to_english_spanish_and_code(name, monkeypatch):
    from raykd.tune.spec import grid_points, point_overrides
    from raykd.tune.trial import trial_config

    monkeypatch.chdir(REPO)  # data paths are relative to the repo root
    from raykd.tune import load_sweep
    from raykd.tune.runner import setup_of

    plan = load_sweep(f"conf/sweep/{name}")
    assert plan.group_by == "language" and plan.files == ["conf/quickstart.yaml"]
    setup = setup_of(plan)
    seen = {}
    for params, variants in grid_points(plan.spec):
        assert point_overrides(params, variants, setup["variants"])  # every point sets keys
        cfg = trial_config({"setup": setup, "params": params, "variants": variants})
        seen[variants["language"]] = (cfg.data.task, cfg.data.path)
        assert cfg.teacher.model == "smollm2-135m-instruct"
        bundles = [b for bs in plan.bundles for b in bs]
        assert all(set(b) == {"CPU"} for b in bundles)  # CPU-only by default
    assert set(seen) == {"en", "es", "code"}
    assert seen["code"] == ("stdlib_code", None)
    if name == "languages.yaml":
        assert seen["en"] == ("dolly", "tests/fixtures/dolly_en.jsonl")
        assert seen["es"] == ("dolly", "tests/fixtures/dolly_es.jsonl")
        assert all((REPO / seen[k][1]).is_file() for k in ("en", "es"))
        assert len(grid_points(plan.spec)) == 6  # 3 languages x 2 temperatures
        # the offline sweep fits the 2-core default node: 2 CPUs per trial at most
        assert max(sum(b["CPU"] for b in bs) for bs in plan.bundles) <= 2.0
    else:
        assert seen["en"] == ("dolly", "hub:databricks/databricks-dolly-15k")
        assert seen["es"] == ("dolly", "hub:argilla/databricks-dolly-15k-curated-multilingual@es")
