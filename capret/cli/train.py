"""``capret-train --config configs/X.yaml [key=value ...]``: train any registered task."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from capret.cli.common import add_debug_flag, fail, print_json, run_guarded
from capret.config import ConfigError, load_config, load_yaml_file
from capret.console import add_progress_flag, progress_wanted


def build_parser() -> argparse.ArgumentParser:
    from capret.tasks.registry import list_tasks

    parser = argparse.ArgumentParser(
        prog="capret-train",
        description="Train a model from a YAML config (configs/*.yaml). The config's `task` key picks the task "
        f"({', '.join(list_tasks())}). Every task's config has the sections data, model, loss and trainer "
        "(plus its own); any field can be overridden with key=value, e.g. trainer.lr=1e-4 trainer.max_steps=100.",
    )
    parser.add_argument("--config", type=Path, required=False, help="YAML config file")
    parser.add_argument(
        "--resume", default=None, help="checkpoint folder to resume from, or 'auto' (latest in output dir)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
    add_progress_flag(parser)
    add_debug_flag(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    from capret.config import to_dict
    from capret.tasks.registry import get_task

    if args.config is None:
        raise ConfigError("--config is required (see configs/*.yaml)")
    raw = load_yaml_file(args.config) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {args.config}: top level must be a mapping, got {type(raw).__name__}")
    task_name = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("task=")), raw.get("task"))
    if not task_name:
        raise ConfigError(f"config file {args.config} has no `task` key")
    spec = get_task(str(task_name))
    overrides = list(args.overrides)
    if not progress_wanted(args):  # --no-progress or CAPRET_NO_PROGRESS: the trainer's bar stays hidden
        overrides.append("trainer.progress=false")
    config: object = load_config(spec.config_cls, args.config, overrides)
    if args.print_config:
        print_json(to_dict(config))
        return 0
    from capret.engine.trainer import NonFiniteLossError

    try:
        with _output_lock(config):
            metrics = spec.run(config, resume=args.resume)
    except NonFiniteLossError as exc:
        # The trainer already wrote the last good checkpoint; say where, in one line, and fail.
        return fail(str(exc), code=1)
    print_json(metrics)
    return 0


def _output_lock(config: object) -> contextlib.AbstractContextManager[object]:
    """The one-writer lock on ``trainer.output_dir`` for the whole run, held by the main process.

    The trainer locks the folder it trains into, but a task also writes around training -- the exported model,
    final metrics, a stage-2 feature cache -- so the command holds the lock from before the task starts until
    it returns (the trainer's own lock nests inside it). Under torchrun only rank 0 takes it; the trainer's lock
    stops every rank together when rank 0 is refused.
    """
    from capret.locks import exclusive_output

    trainer = getattr(config, "trainer", None)
    output_dir = getattr(trainer, "output_dir", None)
    if not output_dir or int(os.environ.get("RANK", "0") or 0) != 0:
        return contextlib.nullcontext()
    return exclusive_output(output_dir, what="training output folder", reentrant=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(_run, args)


if __name__ == "__main__":
    raise SystemExit(main())
