"""The architecture, enforced: the layering contract (import-linter, see pyproject.toml) and
"only raykd.roles talks to Ray"."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY_CALL = re.compile(
    r"\.remote\(|\bray\.(get|put|wait|remote|kill|init)\b|^\s*import ray\b|^\s*from ray\b"
)


def test_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "raykd layers KEPT" in proc.stdout


def test_only_roles_talk_to_ray():
    offenders = []
    for path in sorted((REPO / "raykd").rglob("*.py")):
        rel = path.relative_to(REPO / "raykd")
        if rel.parts[0] in ("roles", "tune"):  # tune drives Ray Tune itself
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if RAY_CALL.search(line):
                offenders.append(f"raykd/{rel}:{n}: {line.strip()}")
    assert not offenders, "Ray used outside raykd/roles:\n" + "\n".join(offenders)


def test_the_contract_names_every_top_level_package():
    text = (REPO / "pyproject.toml").read_text()
    layers = text[text.index("layers = [") :]
    for path in (REPO / "raykd").iterdir():
        name = path.stem if path.suffix == ".py" else path.name
        if name.startswith("_") or name == "py" or not (path.suffix == ".py" or path.is_dir()):
            continue
        if path.is_dir() and not (path / "__init__.py").exists():
            continue
        assert f"raykd.{name}" in layers, f"raykd.{name} is in no layer of the contract"
