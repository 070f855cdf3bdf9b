"""The optional searchers (Optuna, HyperOpt) drive raykd's search space: sampled points stay
inside their domains, variants become choices, every trial gets the sweep's constants.
Skipped where the optional package is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("search", ["optuna", "hyperopt"])
def test_optional_searcher_samples_the_space(search, ray_node, tmp_path: Path):
    pytest.importorskip(search)
    from ray import tune

    from raykd.tune import load_sweep
    from raykd.tune.runner import _search_alg, param_space

    (tmp_path / "run.yaml").write_text("run: {name: base}\n")
    spec = {"configs": ["run.yaml"], "output_dir": str(tmp_path), "search": search,
            "num_samples": 4, "space": {"learner.lr": {"loguniform": [1e-5, 1e-3]}},
            "variants": {"language": {"en": {"data.task": "dolly", "data.path": "en.jsonl"},
                                      "code": {"data.task": "stdlib_code"}}}}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"sweep": spec}, sort_keys=False))
    plan = load_sweep(tmp_path / "sweep.yaml")

    def probe(config: dict) -> None:  # stands in for the pipeline (defined here: by value)
        lr = config["params"]["learner.lr"]
        tune.report({"heldout_ce": abs(lr - 1e-4) * 1e4, "lr": lr,
                     "files": len(config["setup"]["files"]),
                     "language": config["variants"]["language"]})  # fmt: skip

    space = param_space(plan)
    assert type(space["variants"]["language"]).__name__ == "Categorical"
    tuner = tune.Tuner(
        probe,
        param_space=space,
        tune_config=tune.TuneConfig(metric="heldout_ce", mode="min", num_samples=4,
                                    search_alg=_search_alg(plan)),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
    )  # fmt: skip
    results = list(tuner.fit())
    assert len(results) == 4 and all(r.error is None for r in results)
    for r in results:
        assert 1e-5 <= r.metrics["lr"] <= 1e-3
        assert r.metrics["language"] in ("en", "code") and r.metrics["files"] == 1
        assert r.config["setup"]["group_by"] == "language"
