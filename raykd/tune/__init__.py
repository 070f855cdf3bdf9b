"""Ray Tune sweeps over raykd pipelines: each trial is a whole run inside its own reservation.

    raykd sweep conf/sweep/languages.yaml                       # run or resume a sweep
    raykd sweep conf/sweep/languages.yaml sweep.search=random sweep.num_samples=8 \\
        word_kd.steps=20                                        # sweep.* sets the spec
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/sweep.py \\
        conf/sweep/languages.yaml learner.gpus_per_rank=1      # on a cluster

Modules: :mod:`~raykd.tune.spec` (the sweep file, checked before Ray starts),
:mod:`~raykd.tune.trial` (the trainable: config, placement, reporter),
:mod:`~raykd.tune.runner` (Tuner, ASHA, retries, restore), :mod:`~raykd.tune.summary`
(Markdown/JSON/plot). Layout of a sweep directory (``<output_dir>/<name>/``)::

    trials/<variant labels>-<trial id>/   a normal raykd run directory per trial
    tune/                                 Tune's experiment state (restore point)
    summary.md  summary.json  summary.png
"""

from raykd.tune.spec import SweepPlan, SweepSpec, load_sweep

__all__ = ["SweepPlan", "SweepSpec", "load_sweep", "run_sweep"]


def run_sweep(plan: SweepPlan, *, fit: bool = True, callbacks: list | None = None) -> dict:
    """Run (or resume) a sweep; see :func:`raykd.tune.runner.run_sweep`."""
    from raykd.tune.runner import run_sweep as _run

    return _run(plan, fit=fit, callbacks=callbacks)
