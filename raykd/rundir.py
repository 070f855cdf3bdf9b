"""The run directory: one folder per run holding everything a stage writes.

Layout::

    runs/<name>/
      config.yaml              fully resolved config (enough to reproduce the run)
      metrics.jsonl            one JSON object per logged step, every stage
      tb/                      TensorBoard events (same metrics)
      stages/<stage>.json      written when a stage completes (resume skips it)
      checkpoints/<stage>/     latest training checkpoint of a stage (atomic)
      models/<name>/           final models (safetensors, transformers-loadable)
      eval/<model>.json        evaluation results per model
      report.md|json|png       the report

Every file and directory is written atomically (:mod:`raykd.atomic`), so a killed run never
leaves a half-written file behind and resumes from what is complete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from raykd.atomic import atomic_write_json, jsonable


def _ends_a_line(path: Path) -> bool:
    """True if ``path`` is absent, empty, or ends with a newline."""
    if not path.exists() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


class RunDir:
    """Paths and writers of one run."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._log_line_closed = _ends_a_line(self.path("metrics.jsonl"))

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ---- stage bookkeeping (resume) -------------------------------------------------
    def stage_done(self, stage: str) -> dict | None:
        p = self.path("stages", f"{stage}.json")
        return json.loads(p.read_text()) if p.exists() else None

    def mark_done(self, stage: str, summary: dict) -> None:
        atomic_write_json(self.path("stages", f"{stage}.json"), summary)

    def checkpoint_dir(self, stage: str) -> Path:
        return self.path("checkpoints", stage)

    def model_dir(self, name: str) -> Path:
        return self.path("models", name)

    # ---- metrics ----------------------------------------------------------------------
    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        record = {"stage": stage, "step": step, "time": time.time(), **metrics}
        with open(self.path("metrics.jsonl"), "ab") as fh:
            line = json.dumps(record, default=jsonable) + "\n"
            if fh.tell() and not self._log_line_closed:
                line = "\n" + line  # after a line a kill cut short: never glue onto it
            fh.write(line.encode())
        self._log_line_closed = True
        writer = self._writer()
        if writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"{stage}/{key}", value, step)
            writer.flush()

    def read_metrics(self, stage: str | None = None) -> list[dict]:
        """The logged rows, one per ``(stage, step)`` in order of first appearance.

        The log is append-only: a run killed after step ``n`` but before checkpoint ``n``
        logs steps past its last checkpoint, which the resumed run trains and logs again;
        the later row of a ``(stage, step)`` wins. A line cut short by a kill is skipped."""
        p = self.path("metrics.jsonl")
        if not p.exists():
            return []
        rows: dict[tuple, dict] = {}
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if stage is None or row.get("stage") == stage:
                rows[(row.get("stage"), row.get("step"))] = row
        return list(rows.values())

    def _writer(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path("tb")))
            except Exception:  # tensorboard is optional at runtime
                self._tb = False
        return self._tb or None

    def close(self) -> None:
        if self._tb:
            self._tb.close()
