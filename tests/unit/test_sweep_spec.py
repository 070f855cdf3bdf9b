"""Sweep files: everything is checked before Ray starts; points become config overrides;
trial resources follow each point's config; the Tune search space has the right shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raykd.config import ConfigError
from raykd.pipeline.resources import run_bundles, slot_indices
from raykd.tune.spec import axis_values, grid_points, load_sweep, point_overrides

REPO = Path(__file__).resolve().parents[2]


def sweep_file(tmp_path: Path, **spec) -> Path:
    (tmp_path / "run.yaml").write_text("run: {name: base}\nlearner: {lr: 1.0e-4}\n")
    body = {"configs": ["run.yaml"], "output_dir": str(tmp_path / "out"), **spec}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": body}, sort_keys=False))
    return path


def test_an_unknown_key_in_the_space_fails_at_load_naming_file_and_key(tmp_path):
    import ray

    was_up = ray.is_initialized()  # the integration tests' session node may be up already
    path = sweep_file(tmp_path, space={"learner.lrr": {"grid": [1e-4, 1e-3]}})
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert str(path) in msg and "learner.lrr=0.0001" in msg and "unknown config key" in msg
    assert ray.is_initialized() == was_up  # failed before any Ray node started


def test_a_bad_value_of_one_variant_fails_with_the_point(tmp_path):
    variants = {"lang": {"ok": {"data.task": "dolly", "data.path": "x.jsonl"},
                         "bad": {"data.task": "nonexistent"}}}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_sweep(sweep_file(tmp_path, variants=variants))
    assert "(lang=bad)" in str(err.value) and "unknown task" in str(err.value)


def test_spec_keys_and_domains_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep key 'sweep.serach'"):
        load_sweep(sweep_file(tmp_path, serach="random"))
    with pytest.raises(ConfigError, match="grid' takes grid axes only"):
        load_sweep(sweep_file(tmp_path, space={"learner.lr": {"uniform": [1e-5, 1e-3]}}))
    with pytest.raises(ConfigError, match="a domain is one of"):
        load_sweep(sweep_file(tmp_path, space={"learner.lr": [1e-5, 1e-3]}))
    with pytest.raises(ConfigError, match="loguniform needs lo < hi"):
        load_sweep(sweep_file(tmp_path, search="random",
                              space={"learner.lr": {"loguniform": [0, 1e-3]}}))  # fmt: skip
    with pytest.raises(ConfigError, match="cannot be swept"):
        load_sweep(sweep_file(tmp_path, space={"run.name": {"grid": ["a", "b"]}}))
    with pytest.raises(ConfigError, match="ASHA needs an eval metric"):
        load_sweep(sweep_file(tmp_path, eval_every=0, metric="loss"))
    # command-line overrides of the spec are checked the same way
    with pytest.raises(ConfigError, match="command-line override 'sweep.mode=up'"):
        load_sweep(sweep_file(tmp_path), ["sweep.mode=up"])


def test_optional_searchers_fail_clearly_when_missing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real(name, *a))  # fmt: skip
    path = sweep_file(tmp_path, search="optuna", space={"learner.lr": {"choice": [1e-4]}})
    with pytest.raises(ConfigError, match=r"needs the optional package 'optuna' \(pip install"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="cannot grid; use choice"):
        load_sweep(sweep_file(tmp_path, search="hyperopt", space={"x.y": {"grid": [1]}}))


def test_points_cover_every_value_and_the_grid(tmp_path):
    path = sweep_file(
        tmp_path,
        search="random",
        space={"learner.lr": {"loguniform": [1e-5, 1e-3]}, "word_kd.alpha": {"grid": [0.2, 0.5]},
               "learner.micro_batch_size": {"randint": [2, 5]}},
        variants={"lang": {"en": {"data.task": "dolly", "data.path": "en.jsonl"},
                           "code": {"data.task": "stdlib_code"}}},
    )  # fmt: skip
    plan = load_sweep(path, ["sweep.num_samples=3", "word_kd.steps=7"])
    axes = axis_values(plan.spec)
    assert [p for p, _ in axes["learner.lr"]] == [{"learner.lr": 1e-5}, {"learner.lr": 1e-3}]
    assert [p for p, _ in axes["learner.micro_batch_size"]] == [
        {"learner.micro_batch_size": 2}, {"learner.micro_batch_size": 4}]  # fmt: skip
    assert len(grid_points(plan.spec)) == 4  # alpha x lang
    assert plan.spec.num_samples == 3 and plan.overrides[-1] == "word_kd.steps=7"
    assert plan.group_by == "lang"  # the first variant axis
    # 2 + 2 + 2 + 2 single-axis points and the 4 grid points (with lr and micro-batch at
    # their first values), each through load_config once
    assert plan.checked == 12
    assert plan.max_steps == 7 + 4  # word_kd then reverse_kl (the default stages)


def test_point_overrides_keep_types():
    table = {"lang": {"es": {"data.path": "es.jsonl", "pipeline.stages": [{"algorithm": "sft"}]}}}
    got = point_overrides({"learner.lr": 1e-05, "run.seed": 3, "x": "1e-4", "y": None},
                          {"lang": "es"}, table)  # fmt: skip
    assert got == ['learner.lr=1e-05', 'run.seed=3', 'x="1e-4"', 'y=null',
                   'data.path="es.jsonl"', 'pipeline.stages=[{"algorithm": "sft"}]']  # fmt: skip


def test_trial_resources_follow_each_points_multi_rank_config(tmp_path):
    from raykd.tune.runner import param_space, setup_of
    from raykd.tune.trial import trial_config, trial_resources

    path = sweep_file(
        tmp_path,
        overrides=["learner.gpus_per_rank=1", "teacher.gpus_per_worker=0.5",
                   "rollout.num_workers=2"],
        space={"learner.num_ranks": {"grid": [1, 4]}},
    )  # fmt: skip
    plan = load_sweep(path)
    setup = setup_of(plan)
    space = param_space(plan)
    assert space["params"] == {"learner.num_ranks": {"grid_search": [1, 4]}}
    assert space["setup"] == setup and setup["trials_dir"].endswith("out/sweep/trials")
    for ranks in (1, 4):
        config = {"setup": setup, "params": {"learner.num_ranks": ranks}, "variants": {}}
        pgf = trial_resources(config)
        cfg = trial_config(config, "t1")
        assert cfg.run.name == "t1" and cfg.run.output_dir == setup["trials_dir"]
        assert pgf.bundles == run_bundles(cfg) and pgf.strategy == "PACK"
        assert pgf.bundles[0] == {"CPU": 0.5}  # the trial's own driver
        assert sum(b.get("GPU", 0) for b in pgf.bundles) == ranks + 0.5
        idx = slot_indices(cfg)
        assert idx["learner"] == list(range(1, 1 + ranks))
        assert idx["rollout"] == [1 + ranks, 2 + ranks] and idx["teacher"] == [3 + ranks]
    assert [len(b) for b in plan.bundles] == [1 + 1 + 2 + 1, 1 + 4 + 2 + 1]


def test_search_space_shape_per_searcher(tmp_path):
    from raykd.tune.runner import param_space

    variants = {"lang": {"en": {"data.task": "dolly", "data.path": "en.jsonl"},
                         "code": {"data.task": "stdlib_code"}}}  # fmt: skip
    grid = param_space(load_sweep(sweep_file(tmp_path, variants=variants)))
    assert grid["variants"] == {"lang": {"grid_search": ["en", "code"]}}
    plan = load_sweep(sweep_file(tmp_path, search="random", variants=variants,
                                 space={"word_kd.alpha": {"uniform": [0.1, 0.9]}}))  # fmt: skip
    space = param_space(plan)
    assert type(space["params"]["word_kd.alpha"]).__name__ == "Float"
    assert space["variants"]["lang"] == {"grid_search": ["en", "code"]}


def test_the_cli_reports_sweep_errors_without_starting_ray(tmp_path, capsys):
    import ray

    from raykd.cli import main

    was_up = ray.is_initialized()
    bad = sweep_file(tmp_path, space={"learner.nope": {"grid": [1]}})
    assert main(["sweep", str(bad)]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert ray.is_initialized() == was_up
