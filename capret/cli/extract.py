"""``capret-extract --checkpoint CKPT --images DIR|LIST [--captions captions.jsonl] --out DIR``.

Embeds images with a trained dual-stream model and writes sharded features::

    OUT/manifest_r{rank}.json                    identity (model, images, captions), counts, shards + SHA-256
    OUT/features_r{rank}_{shard:05d}_{run}.npy   float32 [n, D], L2-normalised rows
    OUT/ids_r{rank}_{shard:05d}_{run}.npy        the image ids as a numpy string array, aligned with the rows

Shards are written aside and published with one atomic manifest rename, so a killed run leaves the previous
complete run readable; stale shards are removed; a folder holding another model's features is refused without
``--overwrite``. Read it with ``capret.inference.dualstream.extract.read_extraction``.

``--images`` is a folder (every .jpg/.jpeg/.png/.webp/.bmp below it, sorted; the id is the path relative to the
folder without extension) or a text file with one image path per line, optionally followed by a tab and an id
(default: the path relative to ``--root``, itself the list file's folder by default; ids are never absolute paths,
and images outside the root, symbolic links included, are refused unless ``--follow-symlinks``).
With ``--captions`` a caption store JSONL is joined by id (images without a caption use the no-caption path;
the count is reported). Under ``torchrun`` every rank embeds images ``rank, rank + world_size, ...`` (read from the
RANK / WORLD_SIZE environment variables) and writes its own shards, so ranks never share a file.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capret.cli.common import (
    add_bad_image_flag,
    add_caption_coverage_flag,
    add_debug_flag,
    add_device_flag,
    add_image_source_flags,
    doc_body,
    non_negative_int,
    positive_int,
    print_json,
    run_guarded,
)
from capret.config import ConfigError
from capret.console import add_progress_flag, progress_wanted
from capret.io import default_device

_MODEL_MARKERS = ("capret_model.json", "checkpoint.json")


def build_parser() -> argparse.ArgumentParser:
    from capret.inference.dualstream.encoding import PRECISIONS

    p = argparse.ArgumentParser(
        prog="capret-extract",
        description=doc_body(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="model folder, checkpoint or run folder")
    add_image_source_flags(p)
    p.add_argument("--captions", type=Path, default=None, help="caption store JSONL joined by image id")
    p.add_argument("--out", type=Path, required=True, help="output folder for the feature shards")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--shard-size", type=positive_int, default=50_000, help="rows per .npy shard")
    p.add_argument(
        "--num-workers", type=non_negative_int, default=None, help="image decoding workers (default: auto)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="autocast precision (default fp32)",
    )
    add_device_flag(p, local_rank=True)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the features in --out even when they come from a different model or configuration",
    )
    add_bad_image_flag(p, skipped="list it in the manifest")
    add_caption_coverage_flag(p, items="images")
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local (default): this process; ray: Ray Data actors embed, this process writes the shards",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local Ray)")
    add_progress_flag(p)
    add_debug_flag(p)
    return p


def list_images(
    source: Path, *, root: Path | None = None, follow_symlinks: bool = False
) -> tuple[list[Path], list[str]]:
    """Image paths and ids from a folder or a list file (:func:`capret.data.image_list.list_images`)."""
    from capret.data.image_list import list_images as list_image_files

    listed = list_image_files(source, root=root, follow_symlinks=follow_symlinks)
    return listed.paths, listed.ids


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from capret.data.caption_records import read_captions
    from capret.errors import CaptionStoreMismatchError
    from capret.inference.dualstream.encoding import load_model
    from capret.inference.dualstream.extract import (
        ExtractionWriter,
        check_finite_rows,
        check_output_folder,
        folder_fingerprint,
        ids_fingerprint,
    )
    from capret.io import file_sha256, resolve_model_folder
    from capret.locks import job_output, job_token_from_env

    # sizes, coverage and policy were checked by the parser (positive_int, fraction, choices), naming the option
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.engine == "ray" and world_size > 1:
        raise ConfigError("--engine ray spreads the work itself; run it once, not under torchrun")
    if args.ray_address and args.engine != "ray":
        raise ConfigError("--ray-address needs --engine ray")
    device = default_device(args.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    all_paths, all_ids = list_images(args.images, root=args.root, follow_symlinks=args.follow_symlinks)
    paths, ids = all_paths[rank::world_size], all_ids[rank::world_size]
    identity = {
        "model": folder_fingerprint(resolve_model_folder(args.checkpoint, markers=_MODEL_MARKERS)),
        "images": ids_fingerprint(all_ids),
        "captions": None if args.captions is None else file_sha256(args.captions),
        "precision": args.precision,
        "world_size": world_size,
    }
    # One job per folder, taken before the folder is inspected: every rank of this torchrun job writes it,
    # any other job is refused at once naming the holder (two jobs used to race on .incoming-r0-*).
    with job_output(args.out, what="extraction folder", job=job_token_from_env(), member=rank):
        check_output_folder(args.out, identity=identity, overwrite=args.overwrite)
        captions = None
        missing = 0
        if args.captions is not None:
            table = read_captions(args.captions)
            captions = [table.get(i) for i in ids]
            missing = sum(c is None for c in captions)
            if ids and (len(ids) - missing) / len(ids) < args.min_caption_coverage:
                raise CaptionStoreMismatchError(
                    f"only {len(ids) - missing} of {len(ids)} images have a caption (keys are the image ids, e.g. "
                    f"{ids[0]!r}); below --min-caption-coverage {args.min_caption_coverage}",
                    path=args.captions,
                )
        model = load_model(args.checkpoint, device=device)
        skipped: list[dict[str, str]] = []
        stream = None
        if args.engine == "ray":
            from capret.inference.dualstream.ray_encode import encode_on_ray

            stream = encode_on_ray(
                args.checkpoint,
                paths,
                captions,
                batch_size=args.batch_size,
                precision=args.precision,
                device=args.device,
                skip_bad=args.on_bad_image == "skip",
                address=args.ray_address,
            )
        with ExtractionWriter(args.out, rank=rank, world_size=world_size, identity=identity) as writer:
            for start in range(0, len(paths), args.shard_size):
                stop = start + args.shard_size
                bad: list[tuple[int, str]] | None = [] if args.on_bad_image == "skip" else None
                if stream is None:
                    feats = model.encode_images(
                        paths[start:stop],
                        None if captions is None else captions[start:stop],
                        batch_size=args.batch_size,
                        num_workers=args.num_workers,
                        precision=args.precision,
                        progress=rank == 0 and progress_wanted(args),
                        bad_images=bad,
                    )
                else:  # the next rows of the Ray job, in input order
                    rows = [next(stream) for _ in range(min(stop, len(paths)) - start)]
                    feats = np.stack([row[1] for row in rows]).astype(np.float32)
                    if bad is not None:
                        bad.extend((k, row[2]) for k, row in enumerate(rows) if row[2])
                keep = np.ones(len(feats), dtype=bool)
                for index, reason in bad or []:
                    keep[index] = False
                    skipped.append(
                        {"id": ids[start + index], "file": str(paths[start + index]), "reason": reason}
                    )
                kept_ids = [i for i, k in zip(ids[start:stop], keep) if k]
                check_finite_rows(feats[keep], model=str(args.checkpoint), ids=kept_ids)
                writer.write_shard(feats[keep], kept_ids)
            manifest = writer.publish(
                {
                    "checkpoint": str(args.checkpoint),
                    "images": len(paths),
                    "dim": model.embed_dim,
                    "captions": None
                    if captions is None
                    else {"found": len(ids) - missing, "missing": missing},
                    "skipped_images": {"count": len(skipped), "files": skipped},
                }
            )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body(a: argparse.Namespace) -> int:
        print_json(_run(a))
        return 0

    return run_guarded(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
