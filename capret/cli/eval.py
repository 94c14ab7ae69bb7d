"""``capret-eval``: every evaluation mode behind one command.

Modes (picked by the flags given):

* official DeepFashion2 protocol on a result file: ``--protocol deepfashion2 --results R.json --query-gt Q.json
  --gallery-gt G.json``
* mAP / R@k on saved features: ``--metric map --query-features q.npy --gallery-features g.npy --query-labels
  ql.npy --gallery-labels gl.npy``
* a trained dual-stream checkpoint on DeepFashion2-layout data: ``--metric map --checkpoint CKPT --dataset
  deepfashion2 --root DIR --split validation [--captions captions.jsonl]``
* composed image retrieval: ``--dataset fashioniq|cirr|circo --checkpoint CKPT --root DIR --split val|test``

``--rerank NAME`` (geometric, aqe, superglobal, kreciprocal) reranks the top ``--rerank-topk`` of the global
ranking and reports metrics before and after.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from capret.cli.common import print_json, run_guarded
from capret.config import ConfigError

RERANKERS = ("geometric", "aqe", "superglobal", "kreciprocal")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capret-eval",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--protocol", choices=["deepfashion2"], help="official protocol on a result file")
    p.add_argument("--results", type=Path, help="official-format retrieval results JSON")
    p.add_argument("--query-gt", type=Path, help="query_gt.json (official format)")
    p.add_argument("--gallery-gt", type=Path, help="gallery_gt.json (official format)")
    p.add_argument(
        "--legacy-singleton-bug",
        action="store_true",
        help="reproduce the published DeepFashion2 script exactly, including its failure to score identities "
        "with a single gallery item (default: score them as the protocol describes)",
    )
    p.add_argument("--metric", choices=["map"], help="mAP and R@k from embeddings")
    p.add_argument("--query-features", type=Path, help="[Q, D] .npy query embeddings")
    p.add_argument("--gallery-features", type=Path, help="[G, D] .npy gallery embeddings")
    p.add_argument("--query-labels", type=Path, help="[Q] .npy integer identity labels of the queries")
    p.add_argument("--gallery-labels", type=Path, help="[G] .npy integer identity labels of the gallery")
    p.add_argument(
        "--query-images", type=Path, help="text file, one query image path per line (geometric rerank)"
    )
    p.add_argument("--gallery-images", type=Path, help="text file, one gallery image path per line")
    p.add_argument("--checkpoint", type=Path, help="trained model folder (safetensors + JSON sidecar)")
    p.add_argument(
        "--dataset", choices=["deepfashion2", "demo", "fashioniq", "cirr", "circo"], help="dataset"
    )
    p.add_argument("--root", type=Path, help="dataset root folder")
    p.add_argument("--split", default=None, help="split (deepfashion2: validation|train; CIR: val|test)")
    p.add_argument(
        "--category", default=None, help="FashionIQ category (dress|shirt|toptee; default all three)"
    )
    p.add_argument(
        "--gallery-ids",
        type=Path,
        help="CIRCO gallery: COCO image-info JSON, JSON list of ids, or text file of ids (default: the image-info "
        "file under --root, else every <id>.jpg in COCO2017_unlabeled/unlabeled2017)",
    )
    p.add_argument("--captions", type=Path, help="caption store JSONL joined to items by key")
    p.add_argument(
        "--no-captions", action="store_true", help="evaluate the image-only path (caption ablation)"
    )
    p.add_argument("--corrupt-captions", nargs="+", choices=["shuffle", "drop", "replace"], help="--checkpoint: "
                   "also report metrics with these caption corruptions (capret.evaluation.caption_corruption)")  # fmt: skip
    p.add_argument("--corrupt-rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                   help="shares of corrupted captions for --corrupt-captions (default 0 0.25 0.5 1)")  # fmt: skip
    p.add_argument(
        "--ks", type=int, nargs="+", default=[1, 5, 10, 20], help="cut-offs for R@k (default 1 5 10 20)"
    )
    p.add_argument(
        "--index", default="exact", choices=["exact", "flat", "ivfpq", "hnsw"], help="search backend"
    )
    p.add_argument("--rerank", choices=RERANKERS, help="rerank the global ranking")
    p.add_argument("--rerank-topk", type=int, default=100, help="how many top results the reranker reorders")
    p.add_argument("--batch-size", type=int, default=64, help="batch size for feature extraction")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available else cpu)")
    p.add_argument("--out", type=Path, help="also write metrics.json, official results and pictures here")
    return p


def _handler(args: argparse.Namespace) -> str:
    if args.protocol == "deepfashion2":
        return "capret.cli._eval_official"
    if args.dataset in ("fashioniq", "cirr", "circo"):
        return "capret.cli._eval_cir"
    if args.metric == "map" and args.checkpoint is not None:
        return "capret.cli._eval_checkpoint"
    if args.metric == "map" and args.query_features is not None:
        return "capret.cli._eval_features"
    raise ConfigError(
        "choose a mode: --protocol deepfashion2 --results ..., --metric map --query-features ..., "
        "--metric map --checkpoint ... --dataset deepfashion2, or --dataset fashioniq|cirr|circo --checkpoint ..."
    )


def _run(args: argparse.Namespace) -> int:
    module = importlib.import_module(_handler(args))
    print_json(module.run(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(_run, args)


if __name__ == "__main__":
    raise SystemExit(main())
