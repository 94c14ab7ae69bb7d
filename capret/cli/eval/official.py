"""``capret-eval official`` (or ``--protocol deepfashion2``): the official consumer-to-shop top-k of a result file."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capret.cli.eval.common import add_ks, add_out, config_from, require, rerankers
from capret.config import ConfigError

#: ``--ks`` when the user leaves it at the parser default: the cut-offs the official script prints.
PARSER_DEFAULT_KS = [1, 5, 10, 20]


@dataclass
class OfficialEvalConfig:
    """What ``capret-eval official`` scores (the flags below, typed)."""

    protocol: str  # the official protocol (deepfashion2)
    results: Path | None  # official-format retrieval results JSON
    query_gt: Path | None  # query_gt.json
    gallery_gt: Path | None  # gallery_gt.json
    legacy_singleton_bug: bool  # reproduce the published script's singleton-identity failure
    ks: list[int]  # cut-offs (default: the official 1 5 10 15 20)
    rerank: str | None  # rejected: a result file has nothing to rerank with
    out: Path | None  # write metrics.json and a curve here


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--protocol",
        choices=["deepfashion2"],
        default="deepfashion2",
        help="official protocol (deepfashion2)",
    )
    p.add_argument("--results", type=Path, help="official-format retrieval results JSON")
    p.add_argument("--query-gt", type=Path, help="query_gt.json (official format)")
    p.add_argument("--gallery-gt", type=Path, help="gallery_gt.json (official format)")
    p.add_argument(
        "--legacy-singleton-bug",
        action="store_true",
        help="reproduce the published DeepFashion2 script exactly, including its failure to score identities "
        "with a single gallery item (default: score them as the protocol describes)",
    )
    add_ks(p)
    # Accepted only to answer with a pointer to the feature modes (a result file holds no features).
    p.add_argument("--rerank", choices=rerankers(), help=argparse.SUPPRESS)
    add_out(p, "metrics.json and a recall curve")


def config_from_args(namespace: argparse.Namespace) -> OfficialEvalConfig:
    return config_from(namespace, OfficialEvalConfig)


def run(args: OfficialEvalConfig) -> dict[str, Any]:
    """Score ``--results`` against ``--query-gt``/``--gallery-gt``; ``--out`` adds metrics.json and a curve."""
    from capret.evaluation.deepfashion2 import OFFICIAL_KS, evaluate_retrieval_results

    missing = [
        flag
        for flag, value in (
            ("--results", args.results),
            ("--query-gt", args.query_gt),
            ("--gallery-gt", args.gallery_gt),
        )
        if value is None
    ]
    if args.rerank is not None:
        # A result file holds final rankings without features or images, so there is nothing to rerank with.
        raise ConfigError(
            "--rerank needs features: rerank before writing the result file, e.g. capret-eval --metric map "
            "--checkpoint CKPT --dataset deepfashion2 --rerank NAME --out DIR (writes official-format results)"
        )
    if missing:
        raise ConfigError(f"--protocol deepfashion2 needs {', '.join(missing)} (official-format JSON files)")
    ks = list(OFFICIAL_KS) if list(args.ks) == PARSER_DEFAULT_KS else sorted(set(args.ks))
    result = evaluate_retrieval_results(
        require(args.results, "--results"),
        require(args.query_gt, "--query-gt"),
        require(args.gallery_gt, "--gallery-gt"),
        ks=ks,
        legacy_singleton_bug=args.legacy_singleton_bug,
    )
    result = {"protocol": "deepfashion2", "legacy_singleton_bug": args.legacy_singleton_bug, **result}
    if args.out is not None:
        from capret.evaluation.visualize import plot_recall_curve

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2))
        curve = {k: result[f"top{k}"] for k in ks}
        result["recall_png"] = str(
            plot_recall_curve(
                args.out / "recall_at_k.png", {"official top-k": curve}, title="DeepFashion2 official top-k"
            )
        )
    return result
