"""``capret search --pipeline DIR --image photo.jpg [--k 20] [--json] [--out picture.png]``.

Runs the query pipeline of a pipeline folder (``capret quickstart`` leaves one in ``OUT/pipeline``) on one
photo: detect the items, caption them, embed, search the gallery, rerank. Prints the ranked list (or one JSON
object with ``--json``: matches, query items, per-stage milliseconds) and, with ``--out``, draws the query item
and its top results. ``--gallery-id ID`` searches with a gallery item instead of a photo; ``--no-captions`` and
``--no-rerank`` switch those stages off for this call; ``--box x1,y1,x2,y2`` (repeatable) bypasses the detector.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from capret.cli.common import add_command, add_device_flag, positive_int
from capret.config import ConfigError
from capret.console import print_json, run_guarded
from capret.errors import DataError, UsageError

__all__ = ["HELP", "add_parser", "run"]

#: the line of ``capret --help``'s command list (``--help`` of the command prints the module docstring)
HELP = "rank gallery items for a photo with a pipeline folder"


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, __name__, help=HELP, run=run)
    parser.add_argument("--pipeline", type=Path, required=True, help="pipeline folder (pipeline.json)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=Path, help="query photo")
    what.add_argument("--gallery-id", default=None, help="search with a gallery item (more like this)")
    parser.add_argument("--k", type=positive_int, default=20, help="length of the ranked list (default 20)")
    parser.add_argument("--box", action="append", default=None, metavar="X1,Y1,X2,Y2", help="query item box")
    parser.add_argument("--no-captions", action="store_true", help="image-only search (skip the captioner)")
    parser.add_argument("--no-rerank", action="store_true", help="skip the reranker")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to draw the query item and its top results: a .png file, or a folder (a name without suffix) "
        "that gets search_<query>.png",
    )
    add_device_flag(parser)
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the SHA-256 check of the gallery's shards and index (default: verified once per search)",
    )


def _boxes(values: list[str] | None) -> list[list[float]] | None:
    if values is None:
        return None
    boxes = []
    for value in values:
        try:
            box = [float(v) for v in value.split(",")]
        except ValueError:
            raise ConfigError(f"--box {value!r} is not four numbers x1,y1,x2,y2") from None
        if len(box) != 4:
            raise ConfigError(f"--box {value!r} is not four numbers x1,y1,x2,y2")
        boxes.append(box)
    return boxes


def picture_path(out: Path, query: str) -> Path:
    """The PNG ``--out`` names: ``out`` itself when it ends in ``.png``, else a file inside the folder ``out``
    (an existing folder, or a name without suffix), so ``--out DIR`` never writes ``DIR.png`` beside it."""
    if out.suffix.lower() == ".png" and not out.is_dir():
        return out
    if out.suffix and not out.is_dir():
        raise UsageError(f"--out {out}: give a .png file or a folder, not a {out.suffix} file")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(query).stem if Path(query).suffix else query).strip("._")
    return out / f"search_{stem or 'query'}.png"


def _picture(out: Path, *, query: tuple[str, Any], matches: list[Any], title: str) -> Path:
    import numpy as np

    from capret.evaluation.visualize import plot_retrieval_grid

    if not matches:
        raise DataError("no match to draw")
    gallery = [(m.image, m.box) for m in matches]
    ranking = np.arange(len(matches))[None]
    # no ground truth at query time: outline every result as a "hit" (green); the title says so
    return plot_retrieval_grid(
        out,
        query_images=[query],
        gallery_images=gallery,
        ranking=ranking,
        hits=np.ones_like(ranking, dtype=bool),
        k=min(len(matches), 10),
        title=title,
    )


def _search(args: argparse.Namespace) -> int:
    from capret.inference.query.pipeline import RetrievalPipeline

    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    if args.no_verify:
        print("warning: --no-verify: the gallery's checksums are not checked", file=sys.stderr)
    pipeline = RetrievalPipeline.load(args.pipeline, device=args.device, verify=not args.no_verify)
    try:
        rerank = False if args.no_rerank else None
        if args.gallery_id is not None:
            matches = pipeline.search_by_id(args.gallery_id, args.k, rerank=rerank)
            record = pipeline.gallery.items[pipeline.gallery.row_of(args.gallery_id)]
            query: tuple[str, Any] = (str(record["image"]), record.get("box"))
            payload = {"query": args.gallery_id, "matches": [m.to_dict() for m in matches]}
            payload["timings_ms"] = pipeline.last_timings
        else:
            result = pipeline.search_detailed(
                args.image,
                args.k,
                boxes=_boxes(args.box),
                use_captions=False if args.no_captions else None,
                rerank=rerank,
            )
            matches = result.matches
            top_box = matches[0].query_box if matches else (result.items[0].box if result.items else None)
            query = (str(args.image), top_box)
            payload = {"query": str(args.image), **result.to_dict()}
    finally:
        pipeline.close()
    if args.out is not None and matches:
        payload["picture"] = str(
            _picture(
                picture_path(args.out, str(payload["query"])),
                query=query,
                matches=matches,
                title=f"{payload['query']}: top {min(len(matches), 10)}",
            )
        )
    if args.json:
        print_json(payload)
        return 0
    for item in payload.get("items", []):
        print(f"query item box={[round(v) for v in item['box']]} caption={item['caption']!r}")
    print(f"{'rank':>4}  {'score':>7}  gallery id")
    for m in matches:
        print(f"{m.rank:>4}  {m.score:7.4f}  {m.gallery_id}  ({m.image})")
    timings = payload.get("timings_ms", {})
    print("ms: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    if "picture" in payload:
        print(f"picture written to {payload['picture']}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_guarded(_search, args)
