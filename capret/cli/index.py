"""``capret index build``: the gallery side of the query pipeline, built once and resumably.

    capret index build --checkpoint MODEL --images SHOP_DIR|LIST --out GALLERY [--detector NAME | --detections
        dets.json] [--captions template|none|transformers|openai] [--index flat|exact|ivfpq] [--shard-images N]
        [--overwrite]

Detects the items of every gallery photo (default: the whole photo is the item), captions them, embeds them with
the trained model into sharded, memory-mapped features (``GALLERY/features``) and indexes them
(``GALLERY/index.faiss`` or, for ``ivfpq``, an IVF-PQ index with on-disk inverted lists and exact re-scoring).
Re-running the same command continues an interrupted build. Under ``torchrun`` every rank embeds every
``WORLD_SIZE``-th image into its own shards and rank 0 merges the manifests and builds the index. Options of the
detector, captioner and index are given as ``--detector-option key=value`` (repeatable), and so on.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from capret.cli.common import add_command, add_device_flag, add_image_source_flags, positive_int
from capret.config import ConfigError, parse_overrides
from capret.console import add_progress_flag, print_json, progress_wanted, run_guarded

__all__ = ["HELP", "add_parser", "run"]

#: the line of ``capret --help``'s command list (``--help`` of the command prints the module docstring)
HELP = "build a searchable gallery (detect, caption, embed, index) for `capret search`"


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, __name__, help=HELP)
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="build (or resume building) a gallery folder")
    build.add_argument(
        "--checkpoint", type=Path, required=True, help="model folder, checkpoint or run folder"
    )
    add_image_source_flags(build, ids="ids and stored image paths are relative to it")
    build.add_argument("--out", type=Path, required=True, help="gallery folder to write (resumable)")
    build.add_argument("--detector", default=None, help="registered detector name (default: whole image)")
    build.add_argument(
        "--detections", type=Path, default=None, help="COCO results file of an external detector"
    )
    build.add_argument("--detector-option", action="append", default=[], metavar="KEY=VALUE")
    build.add_argument(
        "--captions",
        default="none",
        help="caption backend for the gallery items: none (default), template, ...",
    )
    build.add_argument("--caption-option", action="append", default=[], metavar="KEY=VALUE")
    build.add_argument("--index", default="flat", choices=["flat", "exact", "ivfpq"], help="index kind")
    build.add_argument("--index-option", action="append", default=[], metavar="KEY=VALUE")
    build.add_argument(
        "--shard-images", type=positive_int, default=512, help="images per feature shard (resume unit)"
    )
    build.add_argument("--batch-size", type=positive_int, default=32, help="items per forward pass")
    add_device_flag(build, local_rank=True)
    add_progress_flag(build)
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete the gallery already in --out (needed when another model, detector, captioner "
        "or image list built it; without the flag such a folder is refused)",
    )
    build.set_defaults(run=run)


def _options(pairs: list[str], what: str) -> dict[str, Any]:
    options = parse_overrides(pairs)
    nested = [k for k, v in options.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"--{what}-option keys are plain names, got {nested[0]!r}.*")
    return options


def make_detector(name: str | None, detections: Path | None, options: dict[str, Any]) -> Any:
    """The detector named on a command line: ``--detections`` (COCO results), ``--detector NAME`` or None."""
    from capret.inference.detectors import create_detector

    if detections is not None and name is not None:
        raise ConfigError("give either --detector or --detections, not both")
    if detections is not None:
        return create_detector("coco_results", path=detections, **options)
    return create_detector(name, **options) if name else None


def _build(args: argparse.Namespace) -> dict[str, Any]:
    from capret.data.image_list import list_images
    from capret.engine.distributed import (
        barrier,
        cleanup_distributed,
        exclusive_output_on_main,
        init_distributed,
    )
    from capret.inference.dualstream.encoding import load_model
    from capret.inference.query.captioner import Captioner, CaptionerSettings
    from capret.inference.query.gallery import build_gallery, clear_gallery, finish_gallery

    ctx = init_distributed(args.device)
    try:
        # One writer per gallery folder, taken before --overwrite clears anything (rank 0 holds it for the job).
        with exclusive_output_on_main(args.out, what="gallery folder", ctx=ctx):
            if args.overwrite and ctx.rank == 0:
                clear_gallery(args.out)
            barrier(world_size=ctx.world_size)
            listed = list_images(args.images, root=args.root, follow_symlinks=args.follow_symlinks)
            detector = make_detector(
                args.detector, args.detections, _options(args.detector_option, "detector")
            )
            captioner = None
            settings: dict[str, Any] = {"captioner": None}
            if args.captions != "none":
                caption_settings = CaptionerSettings(
                    backend=args.captions,
                    options=_options(args.caption_option, "caption"),
                    cache=str((args.out / "captions.jsonl").resolve()),
                )
                captioner = Captioner.from_settings(caption_settings)
                settings["captioner"] = caption_settings.to_dict() | {"cache": None}
                if ctx.world_size > 1:  # one caption store per rank: a store has one writer
                    captioner.cache_path = args.out / f"captions_r{ctx.rank}.jsonl"
            model = load_model(args.checkpoint, device=str(ctx.device))
            summary = build_gallery(
                model,
                images=listed.paths,
                ids=listed.ids,
                image_root=listed.root,
                out=args.out,
                detector=detector,
                captioner=captioner,
                model_ref=str(args.checkpoint.resolve()),
                rank=ctx.rank,
                world_size=ctx.world_size,
                shard_images=args.shard_images,
                batch_size=args.batch_size,
                progress=progress_wanted(args) and ctx.rank == 0,
            )
            if captioner is not None:
                captioner.close()
            barrier(world_size=ctx.world_size)
            if ctx.rank == 0:
                settings["model"] = str(args.checkpoint.resolve())
                gallery = finish_gallery(
                    args.out,
                    index=args.index,
                    index_options=_options(args.index_option, "index"),
                    settings=settings,
                    progress=progress_wanted(args),
                )
                summary.update(rows=gallery["rows"], index=gallery["index"], out=str(args.out))
            barrier(world_size=ctx.world_size)
            return summary
    finally:
        cleanup_distributed(ctx)


def run(args: argparse.Namespace) -> int:
    def body(a: argparse.Namespace) -> int:
        summary = _build(a)
        if int(os.environ.get("RANK", "0")) == 0:
            print_json(summary)
        return 0

    return run_guarded(body, args)
