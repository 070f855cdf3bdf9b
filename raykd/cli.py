"""``raykd`` command line.

raykd run CONFIG.yaml [MORE.yaml ...] [key=value ...]   run (or resume) a pipeline
raykd quickstart [key=value ...]                          the offline quickstart
raykd show-config CONFIG.yaml [key=value ...]             print the resolved config
raykd sandbox run PROGRAM.py [--tests TESTS.py] [--json]  run untrusted code in the sandbox
raykd sandbox probe                                       which isolation layers work here
raykd sweep SWEEP.yaml [MORE.yaml ...] [key=value ...]    run or resume a Ray Tune sweep
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from raykd.config import ConfigError, load_config

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"


def _find_conf(name: str) -> Path:
    for base in (Path.cwd() / "conf", REPO_CONF):
        if (base / name).is_file():
            return base / name
    raise ConfigError(f"cannot find conf/{name} (looked in ./conf and {REPO_CONF})")


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides


def _sweep(args: list[str], summary_only: bool) -> int:
    """``raykd sweep``: the sweep file is checked (every point through load_config) first."""
    from raykd.tune import load_sweep, run_sweep

    files, overrides = _split(args)
    try:
        if not files:
            raise ConfigError("no sweep file given")
        plan = load_sweep(files[0], overrides, extra_configs=files[1:])
    except ConfigError as err:
        print(f"raykd: config error: {err}", file=sys.stderr)
        return 2
    summary = run_sweep(plan, fit=not summary_only)
    return 1 if summary["counts"].get("error") else 0


def _compare(ns) -> int:
    from raykd.evaluate.compare import render_markdown, write_comparison

    try:
        result = write_comparison(ns.runs, ns.markdown, ns.png, ns.title)
    except ValueError as err:
        print(f"raykd: compare: {err}", file=sys.stderr)
        return 2
    print(render_markdown(result), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raykd", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run or resume a pipeline from YAML configs")
    p_run.add_argument("args", nargs="+", help="config files and key=value overrides")
    p_q = sub.add_parser("quickstart", help="offline quickstart on SmolLM2-135M (CPU)")
    p_q.add_argument("args", nargs="*", help="key=value overrides")
    p_s = sub.add_parser("show-config", help="print the resolved config")
    p_s.add_argument("args", nargs="+")
    p_box = sub.add_parser("sandbox", help="run a program in the sandbox (see raykd.sandbox)")
    p_box.add_argument("args", nargs=argparse.REMAINDER)
    p_w = sub.add_parser("sweep", help="run or resume a Ray Tune sweep (see raykd.tune)")
    p_w.add_argument("args", nargs="+", help="sweep file, run configs, key=value (sweep.*: spec)")
    p_w.add_argument("--summary-only", action="store_true", help="rewrite the summary only")
    p_c = sub.add_parser("compare", help="compare finished runs (see raykd.evaluate.compare)")
    p_c.add_argument("runs", nargs="+", help="run directories scored on one held-out set")
    p_c.add_argument("--markdown", help="fill the compare markers of this file (or create it)")
    p_c.add_argument("--png", help="write the retention vs training-minutes plot here")
    p_c.add_argument("--title", default="", help="the plot's title")
    ns = parser.parse_args(argv)
    if ns.command == "compare":
        return _compare(ns)
    if ns.command == "sweep":
        return _sweep(ns.args, ns.summary_only)
    if ns.command == "sandbox":
        from raykd.sandbox.cli import main as sandbox_main

        return sandbox_main(ns.args)

    try:
        if ns.command == "quickstart":
            files, overrides = [_find_conf("quickstart.yaml")], ns.args
        else:
            files, overrides = _split(ns.args)
            if not files:
                raise ConfigError("no config file given")
        cfg = load_config(files, overrides)
    except ConfigError as err:
        print(f"raykd: config error: {err}", file=sys.stderr)
        return 2
    if ns.command == "show-config":
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from raykd.pipeline.provenance import RunDirConflict
    from raykd.pipeline.run import run_pipeline
    from raykd.roles.group import RoleActorDied
    from raykd.roles.step_guard import NonFiniteTrainingError

    again = "raykd " + shlex.join([ns.command, *ns.args])
    try:
        run_pipeline(cfg)
    except RoleActorDied as err:  # the stage's roles were released on the way out
        print(f"raykd: {err}; resume from the last checkpoint with: {again}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the stage's actors and placement groups are released
        print(f"raykd: interrupted; resume from the last checkpoint with: {again}",
              file=sys.stderr)  # fmt: skip
        return 130
    except RunDirConflict as err:
        print(f"raykd: {err}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as err:  # raised in a learner: Ray's error wraps it (cause)
        print(f"raykd: {getattr(err, 'cause', err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
