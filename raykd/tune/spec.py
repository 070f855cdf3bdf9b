"""A sweep file: the run configs every trial starts from, the search space, how to search.

A sweep file has one top-level section, ``sweep:`` (:class:`SweepSpec`)::

    sweep:
      name: lr-tau
      configs: [../quickstart.yaml]     # run configs, relative to this file, merged in order
      overrides: [word_kd.steps=20]     # fixed for every trial
      search: random                    # grid | random | optuna | hyperopt
      num_samples: 8
      metric: heldout_ce                # reported every `eval_every` steps; ASHA acts on it
      mode: min
      eval_every: 5
      space:                            # any run-config key -> a domain
        learner.lr: {loguniform: [1.0e-5, 1.0e-3]}
        word_kd.temperature: {choice: [1.0, 2.0, 4.0]}
        word_kd.alpha: {grid: [0.2, 0.5]}
      variants:                         # axes whose values set several keys at once
        language:
          en: {data.task: dolly, data.path: tests/fixtures/dolly_en.jsonl}
          code: {data.task: stdlib_code}

Domains: ``grid`` (every value, crossed with the other grid axes), ``choice`` (one value at
random), ``uniform`` / ``loguniform`` ``[lo, hi]``, ``randint`` ``[lo, hi)``. ``search: grid``
takes grid axes and variants only; ``random`` samples the other domains ``num_samples`` times
per grid point (Ray Tune's basic variant generator); ``optuna`` / ``hyperopt`` (optional
packages) turn variants into choices and refuse ``grid``.

Everything is checked at load time, before Ray starts: the spec's own keys and values, and
every value of every axis, and every grid point, through :func:`raykd.config.load_config`
(so ``learner.lrr`` in the space fails with the config loader's message, naming the sweep
file).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from raykd.config import ConfigError, load_config
from raykd.config.stages import stage_params

SEARCHES = ("grid", "random", "optuna", "hyperopt")
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
#: Keys a sweep sets itself (each trial's run directory) or that Ray Tune owns.
RESERVED_KEYS = ("run.name", "run.output_dir", "ray")
#: Searcher package per search name (imported lazily, only when chosen).
SEARCH_PACKAGES = {"optuna": "optuna", "hyperopt": "hyperopt"}
MAX_CHECKED_POINTS = 512


@dataclass
class SchedulerSpec:
    """Early stopping: ``asha`` (asynchronous successive halving) or ``fifo`` (none)."""

    type: str = "asha"
    grace_period: int = 1  # training steps (summed over stages) before a trial can be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung
    max_t: Optional[int] = None  # rungs up to here; default: the most steps any trial trains
    per_group: bool = True  # trials compete only within their group (sweep.group_by)


@dataclass
class SweepSpec:
    """The ``sweep:`` section of a sweep file (see the module docstring)."""

    name: str = "sweep"
    configs: list[str] = field(default_factory=list)  # relative to the sweep file
    overrides: list[str] = field(default_factory=list)  # key=value, for every trial
    output_dir: Optional[str] = None  # default: the run configs' run.output_dir
    storage_path: Optional[str] = None  # Tune state; default <output_dir>/<name> (s3://... ok)
    search: str = "grid"
    num_samples: int = 1
    seed: int = 0
    max_concurrent_trials: Optional[int] = None  # None: as many as the cluster fits
    metric: str = "heldout_ce"  # reported during training; ASHA and the searcher use it
    mode: str = "min"
    eval_every: int = 10  # steps between held-out evals (0: none; ASHA then has nothing)
    eval_examples: int = 8  # held-out examples scored by each of those evals
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    max_failures: int = 1  # retries of a failed trial (from its last checkpoint)
    resume: bool = True  # an existing sweep directory is restored (Tuner.restore)
    # Summary: the best trial per value of `group_by` (default: the first variant axis, else
    # data.task), ranked by the final `rank_by` of the distilled student (`rank_mode`).
    group_by: Optional[str] = None
    rank_by: str = "rouge_l"
    rank_mode: str = "max"
    space: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepPlan:
    """A loaded, checked sweep: the spec and what every trial needs to build its config."""

    spec: Any  # SweepSpec (DictConfig)
    source: str  # the sweep file
    files: list[str]  # run config files, as paths the driver's working directory resolves
    overrides: list[str]  # fixed overrides for every trial (spec's, then the command line's)
    sweep_dir: str  # <output_dir>/<name>: trials/, tune/ (unless storage_path), summary.*
    storage_path: str
    max_steps: int  # the most training steps any checked point trains (ASHA's max_t)
    checked: int  # how many points went through load_config
    group_by: str
    ray: dict = field(default_factory=dict)  # the run configs' ray section (address, ...)
    bundles: list[list[dict]] = field(default_factory=list)  # run_bundles of each checked point

    @property
    def trials_dir(self) -> str:
        return os.path.join(self.sweep_dir, "trials")


def _value(v: Any) -> str:
    """A config value as dotlist text (JSON is YAML; quoted strings stay strings)."""
    return json.dumps(v)


def point_overrides(params: dict[str, Any], variants: dict[str, str], table: dict) -> list[str]:
    """``key=value`` overrides of one point: its space values, then the keys its variant
    labels set (``table``: ``{axis: {label: {key: value}}}``, the spec's ``variants``)."""
    out = [f"{k}={_value(v)}" for k, v in params.items()]
    for axis, label in variants.items():
        for k, v in table[axis][label].items():
            out.append(f"{k}={_value(v)}")
    return out


def total_steps(cfg) -> int:
    """Training steps of a config's stages, summed (the trial's ``global_step`` at the end)."""
    stages = OmegaConf.to_container(cfg.pipeline.stages, resolve=True) or []
    return sum(int(stage_params(cfg, s).steps) for s in stages)


def stage_offsets(cfg) -> dict[str, int]:
    """Per stage name, the steps of the stages before it (``global_step = offset + step``)."""
    out, n = {}, 0
    for s in OmegaConf.to_container(cfg.pipeline.stages, resolve=True) or []:
        out[s["name"]] = n
        n += int(stage_params(cfg, s).steps)
    return out


# ---- loading ---------------------------------------------------------------------------
def _read_spec(path: Path, overrides: list[str]):
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or set(data) != {"sweep"}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path}: a sweep file has one top-level section 'sweep:', got {got}")
    spec = OmegaConf.structured(SweepSpec)
    sources = [(str(path), {"sweep": data["sweep"] or {}})]
    origins: dict[str, str] = {}
    for item in overrides:
        source = f"command-line override 'sweep.{item}'"
        try:
            sources.append((source, {"sweep": OmegaConf.from_dotlist([item])}))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(f"{source}: {err}") from None
        origins[item.split("=", 1)[0]] = source
    for source, update in sources:
        try:
            spec = OmegaConf.merge({"sweep": spec}, update).sweep
        except ConfigKeyError as err:
            key = getattr(err, "full_key", None) or str(err)
            raise ConfigError(f"{source}: unknown sweep key '{key}'") from None
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            msg = str(getattr(err, "msg", err)).splitlines()[0]
            raise ConfigError(f"{source}: invalid sweep key '{key}': {msg}") from None
    return spec, origins


def _check_spec(spec, source: str, origins: dict[str, str]) -> None:
    problems = []

    def bad(key, value, what):
        where = origins.get(key, source)
        problems.append(f"{where}: sweep key 'sweep.{key}' = {value!r}: {what}")

    if (
        not spec.name
        or not all(c.isalnum() or c in "-_." for c in spec.name)
        or spec.name[0] == "."
    ):
        bad("name", spec.name, "one plain directory name (letters, digits, - _ .)")
    if spec.search not in SEARCHES:
        bad("search", spec.search, f"expected one of {list(SEARCHES)}")
    for key, allowed in (("mode", ("min", "max")), ("rank_mode", ("min", "max"))):
        if spec[key] not in allowed:
            bad(key, spec[key], f"expected one of {list(allowed)}")
    if spec.scheduler.type not in SCHEDULERS:
        bad("scheduler.type", spec.scheduler.type, f"expected one of {list(SCHEDULERS)}")
    for key in ("num_samples", "eval_examples", "scheduler.grace_period"):
        value = OmegaConf.select(spec, key)
        if value < 1:
            bad(key, value, "must be >= 1")
    for key in ("eval_every", "max_failures", "seed"):
        if spec[key] < 0:
            bad(key, spec[key], "must be >= 0")
    if spec.scheduler.reduction_factor <= 1:
        bad("scheduler.reduction_factor", spec.scheduler.reduction_factor, "must be > 1")
    if spec.max_concurrent_trials is not None and spec.max_concurrent_trials < 1:
        bad("max_concurrent_trials", spec.max_concurrent_trials, "must be >= 1 or null")
    if spec.scheduler.type == "asha" and spec.eval_every == 0:
        bad("eval_every", 0, "ASHA needs an eval metric during training: set eval_every > 0")
    if spec.metric.startswith("heldout_") and spec.eval_every == 0:
        bad("metric", spec.metric, "held-out metrics are only reported with eval_every > 0")
    if not spec.configs:
        bad("configs", [], "name at least one run config file")
    package = SEARCH_PACKAGES.get(spec.search)
    if package and importlib.util.find_spec(package) is None:
        bad(
            "search", spec.search, f"needs the optional package '{package}' (pip install {package})"
        )
    problems += _check_space(spec, source)
    if problems:
        raise ConfigError("\n".join(problems))


def _check_space(spec, source: str) -> list[str]:
    out = []
    space = OmegaConf.to_container(spec.space, resolve=True)
    variants = OmegaConf.to_container(spec.variants, resolve=True)
    keys = list(space)
    for axis, labels in variants.items():
        if not isinstance(labels, dict) or not labels:
            out.append(f"{source}: sweep.variants.{axis}: a mapping label -> {{key: value}}")
            continue
        for label, sets in labels.items():
            if not isinstance(sets, dict):
                out.append(f"{source}: sweep.variants.{axis}.{label}: a mapping key -> value")
            else:
                keys += list(sets)
    for key in keys:
        if any(key == r or key.startswith(r + ".") for r in RESERVED_KEYS):
            out.append(f"{source}: '{key}' cannot be swept: the sweep sets {RESERVED_KEYS}")
    for key, dom in space.items():
        where = f"{source}: sweep.space '{key}'"
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
            out.append(f"{where}: a domain is one of {{{', '.join(DOMAINS)}: ...}}, got {dom!r}")
            continue
        kind, args = next(iter(dom.items()))
        if not isinstance(args, list) or not args:
            out.append(f"{where}: {kind} takes a non-empty list, got {args!r}")
        elif kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
                out.append(f"{where}: {kind} takes [lo, hi], got {args!r}")
            elif not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
                out.append(f"{where}: {kind} needs lo < hi (and lo > 0 for loguniform)")
        if kind != "grid" and spec.search == "grid":
            out.append(f"{where}: search 'grid' takes grid axes only; use search: random")
        if kind == "grid" and spec.search in SEARCH_PACKAGES:
            out.append(f"{where}: search '{spec.search}' cannot grid; use choice")
    return out


def axis_values(spec) -> dict[str, list[tuple[dict, dict]]]:
    """Per axis, the ``(params, variants)`` points that cover it: every grid/choice value and
    variant label, the ends of numeric ranges."""
    out: dict[str, list[tuple[dict, dict]]] = {}
    for key, dom in OmegaConf.to_container(spec.space, resolve=True).items():
        kind, args = next(iter(dom.items()))
        values = [args[0], args[1] - 1] if kind == "randint" else list(args)
        out[key] = [({key: v}, {}) for v in values]
    for axis, labels in OmegaConf.to_container(spec.variants, resolve=True).items():
        out[axis] = [({}, {axis: label}) for label in labels]
    return out


def grid_points(spec) -> list[tuple[dict, dict]]:
    """Every combination of the grid axes and variants (first value of the other axes)."""
    return list(iter_grid_points(spec))


def iter_grid_points(spec):
    """:func:`grid_points`, lazily."""
    space = OmegaConf.to_container(spec.space, resolve=True)
    variants = OmegaConf.to_container(spec.variants, resolve=True)
    fixed = {k: next(iter(d.values()))[0] for k, d in space.items() if "grid" not in d}
    axes = [[({k: v}, {}) for v in d["grid"]] for k, d in space.items() if "grid" in d]
    axes += [[({}, {a: lab}) for lab in labels] for a, labels in variants.items()]
    for combo in itertools.product(*axes):
        params, var = dict(fixed), {}
        for p, v in combo:
            params.update(p)
            var.update(v)
        yield params, var


def _has_key(cfg, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return OmegaConf.is_dict(node) and leaf in node


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when inside it (trials on other nodes find
    it in their copy of the working directory), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def load_sweep(
    path: str | Path, overrides: list[str] = (), extra_configs: list[str] = ()
) -> SweepPlan:
    """Load and check a sweep file; ``overrides`` starting with ``sweep.`` set the spec, the
    others every trial's config; ``extra_configs`` are run configs merged after the spec's.

    Raises :class:`ConfigError` (naming the file and key) for any problem, before Ray starts.
    """
    path = Path(path)
    mine = [o[len("sweep.") :] for o in overrides if o.startswith("sweep.")]
    theirs = [o for o in overrides if not o.startswith("sweep.")]
    spec, origins = _read_spec(path, mine)
    source = str(path)
    _check_spec(spec, source, origins)
    files = [_relative(path.parent / f) for f in spec.configs] + [
        _relative(Path(f)) for f in extra_configs
    ]
    fixed = list(spec.overrides) + theirs
    table = OmegaConf.to_container(spec.variants, resolve=True)
    points = [p for axis in axis_values(spec).values() for p in axis]
    points += itertools.islice(iter_grid_points(spec), MAX_CHECKED_POINTS)
    try:
        base = load_config(files, fixed)  # the trials' common config, before any axis
    except ConfigError:
        if not points:
            raise
        # complete only with an axis (say a variant sets data.path): the first point stands in
        base = load_config(files, fixed + point_overrides(*points[0], table))
    group_by = spec.group_by or (next(iter(spec.variants), None) or "data.task")
    if (
        group_by not in spec.variants
        and group_by not in spec.space
        and not _has_key(base, group_by)
    ):
        raise ConfigError(f"{source}: sweep.group_by '{group_by}' is no variant axis or config key")
    from raykd.pipeline.resources import run_bundles

    max_steps, bundles, seen = total_steps(base), [], set()
    for params, variants in points:
        key = json.dumps([params, variants], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        extra = point_overrides(params, variants, table)
        try:
            cfg = load_config(files, fixed + extra)
        except ConfigError as err:
            what = ", ".join([*(f"{k}={v!r}" for k, v in params.items()),
                              *(f"{a}={lab}" for a, lab in variants.items())])  # fmt: skip
            raise ConfigError(f"{source}: sweep point ({what}):\n{err}") from None
        max_steps = max(max_steps, total_steps(cfg))
        bundles.append(run_bundles(cfg))
    output_dir = spec.output_dir or base.run.output_dir
    sweep_dir = os.path.join(output_dir, spec.name)
    storage = spec.storage_path or os.path.abspath(sweep_dir)
    return SweepPlan(spec=spec, source=source, files=files, overrides=fixed, sweep_dir=sweep_dir,
                     storage_path=storage, max_steps=max_steps, checked=len(seen),
                     group_by=group_by, bundles=bundles,
                     ray=OmegaConf.to_container(base.ray, resolve=True))  # fmt: skip
