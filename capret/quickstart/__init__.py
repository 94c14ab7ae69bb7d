"""``capret quickstart``: every stage of the package on the embedded demo dataset, offline, on CPU.

Stages run in order and each adds its own key to ``report.json``. A stage is a module of this package with a
``run(ctx: QuickstartContext) -> dict`` function; stages pass artefacts (caption store path, model folder,
baseline features) to later stages through ``ctx.state``. The report is rewritten atomically after every stage,
so an interrupted quickstart keeps what it finished.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capret.errors import ConfigError
from capret.io import atomic_write_json

__all__ = ["STAGES", "QuickstartContext", "run_quickstart"]

#: (report key, module under capret.quickstart) in execution order.
STAGES: list[tuple[str, str]] = [
    ("data", "data"),
    ("detector", "detector"),
    ("captions", "captions"),
    ("baseline", "baseline"),
    ("dual_stream", "dual_stream"),
    ("rerank", "rerank"),
    ("pipeline", "pipeline"),
]


@dataclass
class QuickstartContext:
    """What a stage needs: where things are, the seed, and artefacts of earlier stages."""

    out_dir: Path  # the --out folder
    data_root: Path  # out_dir / "data": the demo dataset in DeepFashion2 layout
    seed: int = 0  # seed of the dataset and of training
    train_seconds: float | None = None  # training budget override (None: the stage's default)
    state: dict[str, Any] = field(default_factory=dict)  # artefacts handed from stage to stage
    report: dict[str, Any] = field(default_factory=dict)  # the report so far (read-only for stages)


def _summary_line(key: str, result: dict[str, Any]) -> str:
    """One printable line per stage: scalar results, and the metrics of nested tables (``geometric.map``)."""
    parts = []
    for name, value in result.items():
        if isinstance(value, float):
            parts.append(f"{name}={value:.4f}")
        elif isinstance(value, int | str) and len(str(value)) < 60:
            parts.append(f"{name}={value}")
        elif isinstance(value, dict) and "map" in value:
            parts.append(f"{name}.map={value['map']:.4f}")
    return f"[{key}] " + ", ".join(parts[:10])


def run_quickstart(
    out_dir: str | Path,
    *,
    seed: int = 0,
    stages: list[str] | None = None,
    train_seconds: float | None = None,
) -> dict[str, Any]:
    """Run the quickstart stages (all by default) and return the report written to ``out_dir/report.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    valid = [key for key, _ in STAGES]
    if stages:
        unknown = [s for s in stages if s not in valid]
        if unknown:
            raise ConfigError(f"unknown quickstart stage {unknown[0]!r}; valid stages: {', '.join(valid)}")
    ctx = QuickstartContext(
        out_dir=out_dir, data_root=out_dir / "data", seed=seed, train_seconds=train_seconds
    )
    report_path = out_dir / "report.json"
    ctx.report = {"seed": seed, "stages": {}}
    for key, module_name in STAGES:
        if stages and key not in stages and key != "data":
            continue
        module = importlib.import_module(f"capret.quickstart.{module_name}")
        start = time.perf_counter()
        result = module.run(ctx)
        elapsed = time.perf_counter() - start
        ctx.report[key] = result
        ctx.report["stages"][key] = {"seconds": round(elapsed, 2)}
        atomic_write_json(report_path, ctx.report, indent=2, fsync=True)
        print(_summary_line(key, result) + f"  ({elapsed:.1f}s)", flush=True)
    print(f"report written to {report_path}")
    return ctx.report
