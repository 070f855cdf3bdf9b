"""Results always match their config: each step of a run records the hash of what produced it.

A run directory holds one config (``config.yaml``) and, per step (teacher stages, the student
construction, each evaluation, each training stage), a record with the hash of the config
sections, parameters and inputs (teacher and input-model weights, the data file) it depends on.

Rerunning a directory:

* same config, same inputs: finished steps are skipped, an unfinished stage resumes from its
  checkpoint (the normal resume);
* a different config (or ``run.resume=false`` on a directory with results): refused before
  anything is written, with a one-line message naming the differing keys and the two ways
  out: a new ``run.name``, or ``run.overwrite=true``, which redoes every step whose hash
  changed and every step after it (their checkpoints, models and evaluations are removed
  first, so nothing of the old config is resumed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

#: Keys that do not change what a run computes (how it is resumed, where Ray runs).
IGNORED_PREFIXES = ("run.resume", "run.overwrite", "ray.")


class RunDirConflict(ValueError):
    """The run directory holds results that another config produced."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_diff(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every leaf that differs (ignoring :data:`IGNORED_PREFIXES`)."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(IGNORED_PREFIXES):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return out


def digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_fingerprint(path: str | None) -> str | None:
    """Size and mtime of a data file (None when there is no file)."""
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        return None
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class Provenance:
    """Decides, step by step, whether a recorded result can be reused."""

    def __init__(self, root: Path, cfg):
        self.root = root
        self.cfg = cfg
        self.overwrite = bool(cfg.run.overwrite)
        self.redo_rest = False  # a step was redone: every later step is redone too
        self.redone: list[str] = []

    # ---- the whole directory ---------------------------------------------------------
    def check_directory(self) -> None:
        """Refuse (before anything is written) a directory made by another config."""
        saved = self.root / "config.yaml"
        new = OmegaConf.to_container(self.cfg, resolve=True)
        has_results = any((self.root / "stages").glob("*.json"))
        if saved.exists():
            old = yaml.safe_load(saved.read_text()) or {}
            diff = config_diff(old, new)
            if diff and has_results and not self.overwrite:
                shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} keys)" if len(diff) > 6 else "")
                raise RunDirConflict(
                    f"{self.root} holds results of another config ({shown}). Use a new "
                    "run.name, or run.overwrite=true to redo the affected stages and every "
                    "later one."
                )
        if not self.cfg.run.resume and has_results:
            if not self.overwrite:
                raise RunDirConflict(
                    f"run.resume=false but {self.root} already holds results. Use a new "
                    "run.name, or run.overwrite=true to redo every stage."
                )
            self.redo_rest = True

    # ---- one step ----------------------------------------------------------------------
    def reuse(
        self, record: Path, key: str, outputs: list[Path], chain: bool = True,
        required: int = 1,
    ) -> dict | None:  # fmt: skip
        """The recorded result at ``record`` if it was made with hash ``key`` (and the first
        ``required`` of its ``outputs`` exist), else None; a result of another hash is removed with its outputs
        (allowed only with ``run.overwrite``), and, for a step later steps build on
        (``chain``), every later step is redone. An evaluation is not such a step."""
        if not record.exists():
            if self.redo_rest:
                self._remove(outputs)
            return None
        result = json.loads(record.read_text())
        same = result.get("config_hash") == key and all(p.exists() for p in outputs[:required])
        if same and not self.redo_rest:
            return result
        if result.get("config_hash") != key and not self.overwrite and not self.redo_rest:
            raise RunDirConflict(
                f"{record.relative_to(self.root)} was produced from other inputs (its teacher, "
                "input model or data changed since). Use a new run.name, or "
                "run.overwrite=true to redo it and every later stage."
            )
        record.unlink()
        self._remove(outputs)
        if chain:
            self.redo_rest = True
            self.redone.append(record.stem)
        return None

    def _remove(self, outputs: list[Path]) -> None:
        for p in outputs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
