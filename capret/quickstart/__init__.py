"""``capret quickstart``: every stage of the package on the rendered garment world, offline, on CPU.

Two halves, each under ten minutes on 2 CPU cores: ``--task retrieval`` (default: data, clip, captions, baseline,
dual stream, detector, rerank, pipeline) and ``--task cir`` (data, clip, composed retrieval); they share the world
and the tiny CLIP, which a second run reuses. ``--task all`` runs both into one report.

Stages run in order and each adds its own key to ``report.json``. A stage is a module of this package with a
``run(ctx: QuickstartContext) -> dict`` function; stages pass artefacts (caption store path, model folder,
baseline features) to later stages through ``ctx.state``. The report is rewritten atomically after every stage,
so an interrupted quickstart keeps what it finished.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from capret.errors import ConfigError
from capret.io import atomic_write_json
from capret.locks import exclusive_output
from capret.progress import progress_enabled

__all__ = ["STAGES", "QuickstartContext", "run_quickstart"]

#: (report key, module under capret.quickstart) in execution order.
STAGES: list[tuple[str, str]] = [
    ("data", "data"),
    ("clip", "clip"),
    ("captions", "captions"),
    ("baseline", "baseline"),
    ("dual_stream", "dual_stream"),
    ("detector", "detector"),
    ("rerank", "rerank"),
    ("pipeline", "pipeline"),
    ("cir", "cir"),
]
#: The stages of each ``--task``; the photograph demo (``--world demo``) has no image-text split, so no clip/cir.
TASKS: dict[str, tuple[str, ...]] = {
    "retrieval": ("data", "clip", "captions", "baseline", "dual_stream", "detector", "rerank", "pipeline"),
    "cir": ("data", "clip", "cir"),
    "all": tuple(key for key, _ in STAGES),
}
DEMO_STAGES = ("data", "captions", "baseline", "dual_stream", "detector", "rerank", "pipeline")
WORLDS = ("garments", "demo")


@dataclass
class QuickstartContext:
    """What a stage needs: where things are, the seed, and artefacts of earlier stages."""

    out_dir: Path  # the --out folder
    data_root: (
        Path  # the DeepFashion2-layout split folders (world_root/deepfashion2, or out_dir/data for the demo)
    )
    world_root: Path | None = (
        None  # out_dir / "world": the garment world (DeepFashion2, FashionIQ, pretrain, truth)
    )
    world: str = "demo"  # garments | demo (run_quickstart passes garments by default)
    seed: int = 0  # seed of the dataset and of training
    train_seconds: float | None = None  # training budget override (None: the stage's default)
    state: dict[str, Any] = field(default_factory=dict)  # artefacts handed from stage to stage
    report: dict[str, Any] = field(default_factory=dict)  # the report so far (read-only for stages)

    def garment_world(self) -> Path:
        """The garment world's folder, for the stages that need its image-text or FashionIQ splits."""
        if self.world != "garments" or self.world_root is None:
            raise ConfigError("this quickstart stage needs the garment world (--world garments)")
        return self.world_root


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
        elif name == "methods" and isinstance(value, dict):  # the cir stage: R@1 / R@10 of every method
            parts.extend(
                f"{method}.R@1/10={scores['recall@1']:.3f}/{scores['recall@10']:.3f}"
                for method, scores in value.items()
                if isinstance(scores, dict) and {"recall@1", "recall@10"} <= set(scores)
            )
    return f"[{key}] " + ", ".join(parts[:14])


def run_quickstart(
    out_dir: str | Path,
    *,
    seed: int = 0,
    stages: list[str] | None = None,
    train_seconds: float | None = None,
    task: str = "retrieval",
    world: str = "garments",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the quickstart stages of ``task`` (or only ``stages``) and return the report written to
    ``out_dir/report.json`` (``--task cir`` writes ``out_dir/report_cir.json``, so both halves keep theirs).

    Each finished stage prints its summary line on stdout. A bar on stderr names the stage running and the time
    spent (the stages run their own training and captioning silently, so without it a three-minute stage would
    show nothing); ``progress=False`` (``--no-progress``, or ``CAPRET_NO_PROGRESS=1``) hides it."""
    out_dir = Path(out_dir)
    if world not in WORLDS:
        raise ConfigError(f"unknown quickstart world {world!r}; valid worlds: {', '.join(WORLDS)}")
    if task not in TASKS:
        raise ConfigError(f"unknown quickstart task {task!r}; valid tasks: {', '.join(TASKS)}")
    planned = TASKS[task] if world == "garments" else DEMO_STAGES
    if stages:
        unknown = [s for s in stages if s not in planned]
        if unknown:
            raise ConfigError(
                f"unknown quickstart stage {unknown[0]!r} for --task {task} --world {world}; "
                f"valid stages: {', '.join(planned)}"
            )
    with exclusive_output(out_dir, what="quickstart folder"):  # one writer: a second quickstart is refused
        out_dir.mkdir(parents=True, exist_ok=True)
        world_root = out_dir / "world"
        ctx = QuickstartContext(
            out_dir=out_dir,
            data_root=world_root / "deepfashion2" if world == "garments" else out_dir / "data",
            world_root=world_root,
            world=world,
            seed=seed,
            train_seconds=train_seconds,
        )
        report_path = out_dir / ("report_cir.json" if task == "cir" else "report.json")
        ctx.report = {"seed": seed, "task": task, "stages": {}}
        chosen = [
            (key, name)
            for key, name in STAGES
            if key in planned and (not stages or key in stages or key == "data")
        ]
        with tqdm(
            total=len(chosen),
            desc="quickstart",
            unit="stage",
            disable=not progress_enabled(progress),
            bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}] {postfix}",
        ) as bar:
            for key, module_name in chosen:
                bar.set_postfix_str(f"running {key}")
                module = importlib.import_module(f"capret.quickstart.{module_name}")
                start = time.perf_counter()
                result = module.run(ctx)
                elapsed = time.perf_counter() - start
                ctx.report[key] = result
                ctx.report["stages"][key] = {"seconds": round(elapsed, 2)}
                atomic_write_json(report_path, ctx.report, indent=2, fsync=True)
                bar.write(_summary_line(key, result) + f"  ({elapsed:.1f}s)", file=sys.stdout)
                bar.update(1)
        print(f"report written to {report_path}")
        return ctx.report
