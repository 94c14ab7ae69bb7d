"""``capret-eval --protocol deepfashion2``: the official consumer-to-shop top-k of a result file."""

from __future__ import annotations

import argparse
import json
from typing import Any

from capret.config import ConfigError

#: ``--ks`` when the user leaves it at the parser default: the cut-offs the official script prints.
PARSER_DEFAULT_KS = [1, 5, 10, 20]


def run(args: argparse.Namespace) -> dict[str, Any]:
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
        args.results, args.query_gt, args.gallery_gt, ks=ks, legacy_singleton_bug=args.legacy_singleton_bug
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
