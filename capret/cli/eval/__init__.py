"""``capret-eval``: one command, three explicit modes, each with its own flags and typed config.

Modes (``capret-eval MODE --help`` lists each mode's flags):

* ``official`` — the official DeepFashion2 consumer-to-shop top-k of a result file:
  ``capret-eval official --results R.json --query-gt Q.json --gallery-gt G.json``
* ``map`` — mAP / MAP@R / R@k from embeddings, either saved features (``--query-features q.npy
  --gallery-features g.npy --query-labels ql.npy --gallery-labels gl.npy``) or a trained dual-stream checkpoint
  on DeepFashion2-layout data (``--checkpoint CKPT --dataset deepfashion2 --root DIR --split validation
  [--captions captions.jsonl]``); exactly one of ``--query-features`` / ``--checkpoint``.
* ``cir`` — composed image retrieval: ``capret-eval cir --dataset fashioniq|cirr|circo --root DIR --split
  val|test --method combiner|searle|searle-oti|pic2word|lincir|cirevl|image-only|text-only|sum`` (``combiner``,
  the default, takes ``--checkpoint CKPT``; the others ``--clip``/``--mapper``/``--captioner``); the image-only,
  text-only and sum baselines are reported beside every method

The documented flag forms select the same modes without the mode word: ``--protocol deepfashion2`` means
``official``, ``--metric map`` means ``map``, and ``--dataset fashioniq|cirr|circo`` means ``cir``.
In the feature modes, ``--rerank NAME`` reranks the top ``--rerank-topk`` of the global ranking and reports
metrics before and after.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any

from capret.cli.common import doc_body
from capret.config import ConfigError
from capret.console import add_debug_flag, debug_enabled, print_json, run_guarded

__all__ = ["MODES", "RUNNERS", "build_parser", "main", "parse_args", "select_mode"]

#: mode -> module with the mode's flags and typed config (``add_arguments(parser)``,
#: ``config_from_args(namespace)``), light to import so ``--help`` stays fast
MODES: dict[str, str] = {
    "official": "capret.cli.eval.official",
    "map": "capret.cli.eval.map_config",
    "cir": "capret.cli.eval.cir_config",
}
#: mode -> module with ``run(config) -> dict``, imported only when the mode runs
RUNNERS: dict[str, str] = {
    "official": "capret.cli.eval.official",
    "map": "capret.cli.eval.retrieval",
    "cir": "capret.cli.eval.cir",
}

_HELP = {
    "official": "official DeepFashion2 top-k of a result file (--protocol deepfashion2)",
    "map": "mAP / R@k from saved features or a dual-stream checkpoint (--metric map)",
    "cir": "composed image retrieval on FashionIQ / CIRR / CIRCO (--dataset fashioniq|cirr|circo)",
}


def _module(mode: str) -> Any:
    return importlib.import_module(MODES[mode])


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one subcommand per mode, each with only its own flags."""
    parser = argparse.ArgumentParser(
        prog="capret-eval",
        description=doc_body(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="mode", metavar="MODE")
    for mode in MODES:
        mode_parser = sub.add_parser(mode, help=_HELP[mode], description=_HELP[mode])
        _module(mode).add_arguments(mode_parser)
        add_debug_flag(mode_parser)
    return parser


def select_mode(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``(mode, the mode's arguments)`` from an explicit mode word or one of the three documented mode flags."""
    argv = list(argv)
    if argv and argv[0] in MODES:
        return argv[0], argv[1:]
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--protocol")
    probe.add_argument("--metric")
    probe.add_argument("--dataset")
    known, _ = probe.parse_known_args(argv)
    from capret.data import list_datasets

    if known.protocol is not None:
        return "official", argv
    if known.metric is not None:
        return "map", argv
    if known.dataset in list_datasets(kind="cir"):
        return "cir", argv
    raise ConfigError(
        "choose a mode: capret-eval official|map|cir ... (or the flag forms --protocol deepfashion2, --metric "
        "map, --dataset fashioniq|cirr|circo); capret-eval MODE --help lists each mode's flags"
    )


def parse_args(argv: Sequence[str]) -> tuple[str, Any]:
    """``(mode, typed config)`` for ``argv`` without running anything (the README test uses it)."""
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().parse_args(list(argv) or ["--help"])
    mode, rest = select_mode(argv)
    module = _module(mode)
    parser = argparse.ArgumentParser(prog=f"capret-eval {mode}", description=_HELP[mode])
    module.add_arguments(parser)
    add_debug_flag(parser)
    return mode, module.config_from_args(parser.parse_args(rest))


def _run(argv: Sequence[str]) -> int:
    mode, config = parse_args(argv)
    print_json(importlib.import_module(RUNNERS[mode]).run(config))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled() or "--debug" in args
    if not args:
        return run_guarded(select_mode, args, debug=debug)
    return run_guarded(_run, args, debug=debug)


if __name__ == "__main__":
    raise SystemExit(main())
