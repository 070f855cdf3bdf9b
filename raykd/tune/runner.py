"""Running a sweep with Ray Tune: search, ASHA, retries, resume, summary.

:func:`run_sweep` takes a checked :class:`~raykd.tune.spec.SweepPlan` and

* builds the Tune search space (``params``: one Tune domain per ``space`` key; ``variants``:
  a grid, or for Optuna/HyperOpt a choice, over each axis's labels; ``setup``: the constants
  every trial needs, stored with the experiment so a restored trial rebuilds the same config);
* reserves per trial what that trial's config needs (:func:`raykd.tune.trial.trial_resources`)
  — the autoscaler sees exactly these bundles (GPU ones included) as pending demand;
* stops bad trials early with ASHA on ``metric`` (``time_attr = global_step``, rungs from
  ``grace_period`` up to the most steps any trial trains; trials past the last rung run on);
* retries a failed trial ``max_failures`` times from its last checkpoint;
* restores an interrupted sweep (the same command again: ``Tuner.restore`` of
  ``<storage_path>/tune``; unfinished and errored trials continue, finished ones are kept);
* writes ``summary.{md,json,png}`` into the sweep directory.
"""

from __future__ import annotations

import os

import ray
from ray import tune
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raykd.config import ConfigError
from raykd.roles.runtime import init_ray
from raykd.tune.scheduler import GroupedASHA
from raykd.tune.spec import SweepPlan
from raykd.tune.summary import build_summary, trial_records, write_summary
from raykd.tune.trial import run_trial, trial_resources

EXPERIMENT = "tune"  # Tune's experiment directory inside the storage path


def _domain(dom: dict):
    kind, args = next(iter(dom.items()))
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    return tune.randint(*args)


def setup_of(plan: SweepPlan) -> dict:
    """The constants of every trial (``config["setup"]``)."""
    from omegaconf import OmegaConf

    s = plan.spec
    return {
        "files": list(plan.files),
        "overrides": list(plan.overrides),
        "variants": OmegaConf.to_container(s.variants, resolve=True),
        "trials_dir": plan.trials_dir,
        "eval_every": int(s.eval_every),
        "eval_examples": int(s.eval_examples),
        "group_by": plan.group_by,
        "cwd": os.getcwd(),
    }


def param_space(plan: SweepPlan) -> dict:
    """Tune's ``param_space``: ``{"setup": constants, "params": domains, "variants": ...}``."""
    from omegaconf import OmegaConf

    s = plan.spec
    space = OmegaConf.to_container(s.space, resolve=True)
    labels = {a: list(v) for a, v in OmegaConf.to_container(s.variants, resolve=True).items()}
    pick = tune.choice if s.search in ("optuna", "hyperopt") else tune.grid_search
    return {
        "setup": setup_of(plan),
        "params": {k: _domain(d) for k, d in space.items()},
        "variants": {a: pick(v) for a, v in labels.items()},
    }


def _search_alg(plan: SweepPlan):
    s = plan.spec
    limit = s.max_concurrent_trials
    if s.search in ("grid", "random"):
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=s.seed, max_concurrent=limit or 0)
    try:
        if s.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=s.seed)
        else:
            from ray.tune.search.hyperopt import HyperOptSearch

            searcher = HyperOptSearch(random_state_seed=s.seed)
    except (ImportError, AssertionError) as err:
        raise ConfigError(
            f"{plan.source}: sweep.search={s.search} needs the optional package "
            f"'{s.search}' (pip install {s.search}): {err}"
        ) from None
    if limit:
        from ray.tune.search import ConcurrencyLimiter

        searcher = ConcurrencyLimiter(searcher, max_concurrent=limit)
    return searcher


def scheduler_of(plan: SweepPlan):
    sc = plan.spec.scheduler
    if sc.type == "fifo":
        return FIFOScheduler()
    max_t = int(sc.max_t or plan.max_steps)
    cls = GroupedASHA if sc.per_group else ASHAScheduler
    return cls(time_attr="global_step", max_t=max(max_t, sc.grace_period),
               grace_period=sc.grace_period, reduction_factor=sc.reduction_factor,
               stop_last_trials=False)  # fmt: skip


def _trial_dirname(trial) -> str:
    return trial.trial_id


def trainable():
    """The trainable Tune runs (and a restore must be given again)."""
    return tune.with_resources(run_trial, trial_resources)


def make_tuner(plan: SweepPlan, callbacks: list | None = None) -> tuple[Tuner, bool]:
    """A new Tuner, or the restored one when the sweep's experiment exists; ``(tuner,
    restored)``. ``callbacks``: Tune callbacks of a new sweep (a restored sweep keeps its
    own)."""
    s = plan.spec
    path = os.path.join(plan.storage_path, EXPERIMENT)
    if Tuner.can_restore(path):
        if not s.resume:
            raise ConfigError(
                f"{plan.source}: sweep '{s.name}' exists at {path} and sweep.resume=false; "
                "remove it or choose another sweep.name"
            )
        print(f"[raykd sweep] restoring {path}", flush=True)
        tuner = Tuner.restore(path, trainable=trainable(), resume_unfinished=True,
                              resume_errored=True)  # fmt: skip
        return tuner, True
    tune_config = TuneConfig(
        metric=s.metric,
        mode=s.mode,
        search_alg=_search_alg(plan),
        scheduler=scheduler_of(plan),
        num_samples=s.num_samples,  # the concurrency limit lives in the search algorithm
        trial_dirname_creator=_trial_dirname,
    )
    run_config = RunConfig(
        name=EXPERIMENT,
        storage_path=plan.storage_path,
        failure_config=FailureConfig(max_failures=s.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
        log_to_file=True,
        verbose=1,
        callbacks=callbacks,
    )
    # One checkpoint kept per trial: Tune then snapshots the experiment at every report, so a
    # restore knows each trial's latest step (cheap here; Tune warns about it by default).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tuner = Tuner(trainable(), param_space=param_space(plan), tune_config=tune_config,
                  run_config=run_config)  # fmt: skip
    return tuner, False


def summary_spec(plan: SweepPlan) -> dict:
    s, sc = plan.spec, plan.spec.scheduler
    sched = "fifo" if sc.type == "fifo" else (
        f"asha (grace {sc.grace_period}, factor {sc.reduction_factor:g})"
    )  # fmt: skip
    return {"name": s.name, "metric": s.metric, "mode": s.mode, "rank_by": s.rank_by,
            "rank_mode": s.rank_mode, "group_by": plan.group_by, "eval_every": s.eval_every,
            "scheduler": sched}  # fmt: skip


def summarize(grid, plan: SweepPlan) -> dict:
    """Write the summary of a ``ResultGrid``; return it (with ``files``)."""
    records = trial_records(grid, setup_of(plan), plan.spec.metric, plan.spec.rank_by)
    summary = build_summary(records, summary_spec(plan))
    summary["files"] = write_summary(summary, plan.sweep_dir)
    return summary


def _check_fits(plan: SweepPlan, available: dict) -> None:
    """On a fixed-size (local) node, a trial bigger than the node would wait forever."""
    for bundles in plan.bundles:
        for res in ("CPU", "GPU"):
            need = sum(b.get(res, 0.0) for b in bundles)
            if need > available.get(res, 0.0) + 1e-9:
                raise ConfigError(
                    f"{plan.source}: a trial reserves {need:g} {res} (driver + its roles: "
                    f"{bundles}) but the local Ray node has {available.get(res, 0.0):g}; "
                    "lower the roles' cpus_per_*/gpus_per_* or num_workers, or join a cluster"
                )


def run_sweep(plan: SweepPlan, *, fit: bool = True, callbacks: list | None = None) -> dict:
    """Run (or resume) the sweep; return its summary. ``fit=False``: only (re)write the
    summary of an existing sweep; ``callbacks``: Tune callbacks (a new sweep's)."""
    ray_cfg = plan.ray
    init_ray(
        ray_cfg.get("address"), ray_cfg.get("num_cpus"), ray_cfg.get("num_gpus"),
        ray_cfg.get("allocator", "jemalloc"),
    )  # fmt: skip
    if not (ray_cfg.get("address") or os.environ.get("RAY_ADDRESS")):
        _check_fits(plan, ray.cluster_resources())
    tuner, restored = make_tuner(plan, callbacks)
    if not fit:
        if not restored:
            raise ConfigError(f"{plan.source}: no sweep to summarise at {plan.storage_path}")
        grid = tuner.get_results()
    else:
        print(f"[raykd sweep] {plan.spec.name}: {plan.checked} points checked; per trial "
              f"{plan.bundles[0] if plan.bundles else '?'}; trials in {plan.trials_dir}",
              flush=True)  # fmt: skip
        grid = tuner.fit()
    summary = summarize(grid, plan)
    print(f"[raykd sweep] summary: {summary['files']['md']}", flush=True)
    return summary
