"""``raykd sandbox`` subcommand.

raykd sandbox run PROGRAM.py [--tests TESTS.py] [--stdin FILE] [--expected-stdout FILE]
                  [--timeout S] [--memory-mb N] [--layers a,b] [--require a,b] [--json]
raykd sandbox probe [--json]

``run`` prints the verdict (a table, or JSON) with the layers used; exit status 0 if it
passed, 1 if not, 3 if a required layer is missing here. ``probe`` prints which layers work.
"""

from __future__ import annotations

import argparse
import json
import sys

from raykd.sandbox.core import Limits, Sandbox, SandboxUnavailable, probe


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykd sandbox", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a program (and its tests) in the sandbox")
    r.add_argument("program", help="Python file to run")
    r.add_argument("--tests", help="Python file executed after the program, same namespace")
    r.add_argument("--stdin", help="file fed to the program's stdin")
    r.add_argument("--expected-stdout", help="file the program's stdout must match")
    r.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds")
    r.add_argument("--memory-mb", type=int, default=1024, help="address space limit")
    r.add_argument("--layers", default="auto", help="comma-separated layers, or auto")
    r.add_argument("--require", default="", help="comma-separated layers that must work")
    r.add_argument("--json", action="store_true", help="print the verdict as JSON")
    q = sub.add_parser("probe", help="show which isolation layers work on this machine")
    q.add_argument("--json", action="store_true")
    return p


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    out = []
    for key, value in rows:
        lines = str(value).rstrip("\n").split("\n") or [""]
        out.append(f"{key:<{width}}  {lines[0]}")
        out += [f"{'':<{width}}  {ln}" for ln in lines[1:]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sandbox"]:
        argv = argv[1:]
    args = _parser().parse_args(argv)
    if args.cmd == "probe":
        info = probe()
        if args.json:
            print(json.dumps(info, indent=2, sort_keys=True))
        else:
            rows = [(k, info[k]) for k in sorted(info) if k != "errors"]
            rows += [(f"why no {k}", v) for k, v in sorted(info["errors"].items())]
            print(_table(rows))
        return 0
    layers = "auto" if args.layers == "auto" else _split(args.layers)
    limits = Limits(timeout=args.timeout, memory=args.memory_mb << 20)
    try:
        sandbox = Sandbox(require=_split(args.require), layers=layers, limits=limits)
    except SandboxUnavailable as e:
        print(f"raykd sandbox: {e}", file=sys.stderr)
        return 3
    v = sandbox.run(
        _read(args.program),
        _read(args.tests),
        stdin=_read(args.stdin),
        expected_stdout=_read(args.expected_stdout),
    )
    if args.json:
        print(json.dumps(v.to_dict(), indent=2))
    else:
        rows = [
            ("status", v.status),
            ("reason", v.reason),
            ("seconds", f"{v.seconds:.3f}"),
            ("cpu seconds", "-" if v.cpu_seconds is None else f"{v.cpu_seconds:.3f}"),
            ("exit code", "-" if v.exit_code is None else v.exit_code),
            ("signal", "-" if v.signal is None else v.signal),
            ("layers", ", ".join(v.layers)),
            ("not isolated", "; ".join(sandbox.missing) or "-"),
            ("stdout", v.stdout or "-"),
            ("stderr", v.stderr or "-"),
        ]
        print(_table(rows))
    return 0 if v.passed else 1


if __name__ == "__main__":
    sys.exit(main())
