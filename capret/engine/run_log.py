"""The run folder of rank 0: CSV logs (``train_log.csv``, ``eval_log.csv``), TensorBoard event files, and moving a
previous run's outputs aside when a fresh run starts in the same folder."""

from __future__ import annotations

import csv
import datetime as _dt
import logging
from pathlib import Path
from typing import Any

__all__ = ["RUN_OUTPUTS", "RunLog", "supersede_previous_run"]

logger = logging.getLogger(__name__)

#: what a run writes into its folder (config.yaml is simply rewritten)
RUN_OUTPUTS = ("checkpoints", "best", "tensorboard", "train_log.csv", "eval_log.csv")


def supersede_previous_run(output_dir: Path) -> Path | None:
    """Move the outputs of an earlier run out of the way of a fresh (not resumed) run; returns where they went.

    Stale checkpoints must not stay beside the new ones: ``resume="auto"`` would later pick the old run's newest
    step. Nothing is deleted: the old files go to ``<output_dir>/superseded/<UTC time>/``.
    """
    present = [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not present:
        return None
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = output_dir / "superseded" / stamp
    target.mkdir(parents=True)
    for path in present:
        path.rename(target / path.name)
    logger.warning(
        "%s held outputs of an earlier run; moved them to %s (pass resume='auto' to continue a run instead)",
        output_dir,
        target,
    )
    return target


class RunLog:
    """CSV (``train_log.csv``, ``eval_log.csv``) and TensorBoard writer of rank 0.

    CSV columns are fixed by the first row written; a row with a new key rewrites the file with the widened
    header (rare: only when a task adds a term mid-run). On resume, rows after the resumed step are dropped, so
    the log of an interrupted-and-resumed run equals that of an uninterrupted one.
    """

    def __init__(self, output_dir: Path, *, resume_step: int | None, tensorboard: bool) -> None:
        self.paths = {"train": output_dir / "train_log.csv", "eval": output_dir / "eval_log.csv"}
        self.rows: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
        for kind, path in self.paths.items():
            if resume_step is not None and path.is_file():
                with path.open(newline="") as handle:
                    kept = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
                self.rows[kind] = kept
                self._rewrite(kind)
            elif path.exists():
                path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)

    def _fields(self, kind: str) -> list[str]:
        fields: list[str] = []
        for row in self.rows[kind]:
            fields.extend(k for k in row if k not in fields)
        return fields

    def _rewrite(self, kind: str) -> None:
        with self.paths[kind].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._fields(kind) or ["step"])
            writer.writeheader()
            writer.writerows(self.rows[kind])

    def write(self, kind: str, row: dict[str, Any]) -> None:
        old_fields = self._fields(kind)
        self.rows[kind].append(row)
        if not old_fields or any(k not in old_fields for k in row):
            self._rewrite(kind)
        else:
            with self.paths[kind].open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=old_fields).writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"{kind}/{key}", value, global_step=int(row["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
