"""``capret catalogue``: a living catalogue on LanceDB (a local folder or an ``s3://`` URI).

    capret catalogue create --model M --root PHOTOS [--detector D] [--captioner template|openai|...] DIR
    capret catalogue add DIR PHOTOS... | --list FILE [--category C] [--engine local|ray] [--batch-images N]
    capret catalogue remove DIR ID... | --image PATH
    capret catalogue update DIR --id ID (--caption TEXT | --image PHOTO [--box X1 Y1 X2 Y2]) | --reembed [--model M]
    capret catalogue search DIR --image PHOTO [--box ...] [--text T] [--category C] [--top K] [--rerank NAME]
    capret catalogue stats DIR | doctor DIR [--no-verify] | optimize DIR [--rebuild]

Every command prints one JSON object. ``doctor`` exits with 1 when it finds a problem. Source photos read back
(``update``, ``doctor``) are checked against their rows' SHA-256; ``--no-verify`` skips that, with a warning. Object-store options
(endpoint, keys) are ``--storage-option key=value`` (repeatable) or the usual ``AWS_*`` variables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from capret.cli.common import add_command, non_negative_float
from capret.config import ConfigError, parse_overrides
from capret.console import add_progress_flag, print_json, progress_wanted

__all__ = ["HELP", "add_parser", "run"]

#: the line of ``capret --help``'s command list (``--help`` of the command prints the module docstring)
HELP = "a living catalogue on LanceDB: create, add, remove, update, search, stats, doctor, optimize"


def _location(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="catalogue folder or object-store URI (s3://bucket/path)")
    parser.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE", help="object-store option"
    )
    parser.add_argument("--root", default=None, help="override the catalogue's root of source photos")


def _no_verify_flag(parser: argparse.ArgumentParser, *, otherwise: str) -> None:
    """``--no-verify`` of the actions that read source photos back (update, doctor); :func:`_verify` reads it."""
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help=f"skip the SHA-256 check of the source photos read back (default: {otherwise})",
    )


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, __name__, help=HELP, run=run)
    sub = parser.add_subparsers(dest="catalogue_command", metavar="ACTION", required=True)

    create = sub.add_parser("create", help="a new, empty catalogue for one model")
    create.add_argument("dir", metavar="DIR", help="catalogue folder or object-store URI")
    create.add_argument("--model", type=Path, required=True, help="dual-stream model folder that embeds rows")
    create.add_argument("--root", type=Path, required=True, help="folder the source photos lie under")
    create.add_argument("--detector", default=None, help="registered detector (default: the whole photo)")
    create.add_argument("--detector-option", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument(
        "--captioner", default="template", help="caption backend, or 'none' (default: template)"
    )
    create.add_argument("--captioner-option", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--prompt-set", default="capret-chat-v1", help="captioning prompt set")
    create.add_argument("--max-items", type=int, default=5, help="most items kept per photo (default: 5)")
    create.add_argument(
        "--index-threshold", type=int, default=100_000, help="rows from which optimize builds IVF-PQ"
    )
    create.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")

    add = sub.add_parser("add", help="add photos (detect -> caption -> embed); duplicates skipped")
    _location(add)
    add.add_argument("photos", nargs="*", help="photo files or folders")
    add.add_argument("--list", type=Path, default=None, help="text file: one photo per line [TAB category]")
    add.add_argument("--category", default=None, help="category of every photo added (else the detector's)")
    add.add_argument("--engine", default="local", help="local (default) or ray")
    add.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local Ray)")
    add.add_argument("--batch-images", type=int, default=16, help="photos per committed batch (default: 16)")
    add.add_argument("--device", default=None, help="torch device")
    add_progress_flag(add)

    remove = sub.add_parser("remove", help="remove items by id, or every item of a photo")
    _location(remove)
    remove.add_argument("ids", nargs="*", help="item ids")
    remove.add_argument("--image", action="append", default=[], help="source photo (path under the root)")

    update = sub.add_parser("update", help="new caption or photo for an item, or re-embed with a new model")
    _location(update)
    update.add_argument("--id", dest="item", default=None, help="the item to update")
    update.add_argument("--caption", default=None, help="a caption written by a person")
    update.add_argument("--image", type=Path, default=None, help="a new photo of the item (under the root)")
    update.add_argument("--box", type=float, nargs=4, default=None, metavar=("X1", "Y1", "X2", "Y2"))
    update.add_argument("--reembed", action="store_true", help="re-embed rows of another model fingerprint")
    update.add_argument("--model", type=Path, default=None, help="with --reembed: switch to this model")
    update.add_argument("--device", default=None, help="torch device")
    _no_verify_flag(update, otherwise="each is checked against its row")

    search = sub.add_parser("search", help="search with a photo (optionally a box, a text, a category)")
    _location(search)
    search.add_argument("--image", type=Path, required=True, help="query photo")
    search.add_argument("--box", type=float, nargs=4, default=None, metavar=("X1", "Y1", "X2", "Y2"))
    search.add_argument("--text", default=None, help="text used in the caption's place")
    search.add_argument("--category", default=None, help="only items of this category (prefiltered)")
    search.add_argument("--top", type=int, default=10, help="results (default: 10)")
    search.add_argument("--rerank", default=None, help="reranker name (aqe, superglobal, kreciprocal)")
    search.add_argument("--no-captions", action="store_true", help="image-only query")
    search.add_argument("--device", default=None, help="torch device")

    _location(sub.add_parser("stats", help="rows, photos, categories, index, versions"))
    doctor = sub.add_parser("doctor", help="check for problems")
    _location(doctor)
    _no_verify_flag(doctor, otherwise="changed photos are problems")
    optimize = sub.add_parser("optimize", help="build or update the indexes, compact, clean old versions")
    _location(optimize)
    optimize.add_argument("--rebuild", action="store_true", help="retrain the IVF-PQ even if it is fresh")
    optimize.add_argument(
        "--older-than",
        type=non_negative_float,
        default=0.0,
        help="keep versions younger than this many seconds (default 0)",
    )


def _options(pairs: list[str], flag: str) -> dict[str, Any]:
    try:
        return parse_overrides(pairs)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _open(args: argparse.Namespace) -> Any:
    from capret.catalogue import Catalogue

    return Catalogue.open(
        args.dir, storage_options=_storage(args.storage_option), root=getattr(args, "root", None)
    )


def _verify(args: argparse.Namespace, what: str) -> bool:
    """False with a warning on stderr under ``--no-verify`` (the JSON on stdout stays parseable)."""
    if args.no_verify:
        print(f"warning: --no-verify: the SHA-256 of {what} is not checked", file=sys.stderr)
        return False
    return True


def _storage(pairs: list[str]) -> dict[str, str]:
    return {k: str(v) for k, v in _options(pairs, "--storage-option").items()}


def run(args: argparse.Namespace) -> int:
    command = args.catalogue_command
    result = _COMMANDS[command](args)
    print_json(result)
    if command == "doctor" and not result["ok"]:
        return 1
    return 0


def _create(args: argparse.Namespace) -> dict[str, Any]:
    from capret.catalogue import Catalogue, CatalogueSettings, model_fingerprint
    from capret.inference.dualstream.encoding import load_model

    if not args.root.is_dir():
        raise ConfigError(f"--root {args.root} is not a folder")
    if args.max_items < 1 or args.index_threshold < 1:
        raise ConfigError("--max-items and --index-threshold must be >= 1")
    model = load_model(args.model, device="cpu")
    detector = None
    if args.detector:
        detector = {"name": args.detector, "options": _options(args.detector_option, "--detector-option")}
    captioner = None
    if args.captioner != "none":
        captioner = {
            "backend": args.captioner,
            "options": _options(args.captioner_option, "--captioner-option"),
            "prompt_set": args.prompt_set,
            "loop": {},
            "cache": None,
        }
    settings = CatalogueSettings(
        model=str(args.model.resolve()),
        fingerprint=model_fingerprint(args.model),
        dim=int(model.embed_dim),
        root=str(args.root.resolve()),
        detector=detector,
        captioner=captioner,
        max_items=args.max_items,
        index_threshold=args.index_threshold,
    )
    catalogue = Catalogue.create(args.dir, settings=settings, storage_options=_storage(args.storage_option))
    return {"created": catalogue.location, "fingerprint": settings.fingerprint, "dim": settings.dim}


def _add(args: argparse.Namespace) -> dict[str, Any]:
    from capret.catalogue import add_images, create_engine
    from capret.catalogue.ingest import expand_photos, read_list

    photos = expand_photos(args.photos)
    categories: list[str | None] = [args.category] * len(photos)
    if args.list is not None:
        listed, listed_categories = read_list(args.list)
        photos += listed
        categories += [c or args.category for c in listed_categories]
    if not photos:
        raise ConfigError("nothing to add: give photos, folders or --list FILE")
    options: dict[str, Any] = {"device": args.device}
    if args.engine == "ray":
        options["address"] = args.ray_address
    elif args.ray_address:
        raise ConfigError("--ray-address needs --engine ray")
    engine = create_engine(args.engine, **options)
    return add_images(
        _open(args),
        photos,
        categories=categories,
        engine=engine,
        batch_images=args.batch_images,
        progress=progress_wanted(args),
    )


def _remove(args: argparse.Namespace) -> dict[str, Any]:
    from capret.catalogue.ingest import relative_to_root

    if not args.ids and not args.image:
        raise ConfigError("nothing to remove: give item ids or --image PATH")
    catalogue = _open(args)
    images = []
    for image in args.image:
        path = Path(image)
        images.append(
            relative_to_root(catalogue.settings.root, path) if path.is_absolute() else path.as_posix()
        )
    with catalogue.writing():
        removed = catalogue.remove(ids=args.ids, images=images)
    return {"removed_rows": removed, "rows": len(catalogue)}


def _update(args: argparse.Namespace) -> dict[str, Any]:
    from capret.catalogue import reembed, update_caption, update_image

    catalogue = _open(args)
    verify = _verify(args, "the source photos")
    if args.reembed:
        if args.item or args.caption or args.image:
            raise ConfigError("--reembed re-embeds every row; it takes no --id, --caption or --image")
        return reembed(
            catalogue, model=args.model, device=args.device, progress=progress_wanted(args), verify=verify
        )
    if args.model is not None:
        raise ConfigError("--model is only used with --reembed")
    if not args.item or (args.caption is None) == (args.image is None):
        raise ConfigError("give --id ID with exactly one of --caption TEXT or --image PHOTO (or --reembed)")
    if args.caption is not None:
        return update_caption(catalogue, args.item, args.caption, device=args.device, verify=verify)
    return update_image(catalogue, args.item, args.image, box=args.box, device=args.device)


def _search(args: argparse.Namespace) -> dict[str, Any]:
    from capret.catalogue import CatalogueSearcher

    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    searcher = CatalogueSearcher(_open(args), device=args.device, captions=not args.no_captions)
    try:
        return searcher.search(
            args.image, k=args.top, box=args.box, text=args.text, category=args.category, rerank=args.rerank
        )
    finally:
        searcher.close()


def _stats(args: argparse.Namespace) -> dict[str, Any]:
    from capret.catalogue import stats

    return stats(_open(args))


def _doctor(args: argparse.Namespace) -> dict[str, Any]:
    from capret.catalogue import doctor

    return doctor(_open(args), verify=_verify(args, "the source photos"))


def _optimize(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = _open(args).optimize(rebuild=args.rebuild, older_than=args.older_than)
    return result


_COMMANDS = {
    "create": _create,
    "add": _add,
    "remove": _remove,
    "update": _update,
    "search": _search,
    "stats": _stats,
    "doctor": _doctor,
    "optimize": _optimize,
}
