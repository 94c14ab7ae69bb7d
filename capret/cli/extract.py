"""``capret-extract --checkpoint CKPT --images DIR|LIST [--captions captions.jsonl] --out DIR``.

Embeds images with a trained dual-stream model and writes sharded features::

    OUT/features_r{rank}_{shard:05d}.npy   float32 [n, D], L2-normalised rows
    OUT/ids_r{rank}_{shard:05d}.txt        one image id per line, aligned with the rows
    OUT/manifest_r{rank}.json              shards of this rank, counts, model, dimensions

``--images`` is a folder (every .jpg/.jpeg/.png/.webp/.bmp below it, sorted; the id is the path relative to the
folder without extension) or a text file with one image path per line, optionally followed by a tab and an id.
With ``--captions`` a caption store JSONL is joined by id (images without a caption use the no-caption path;
the count is reported). Under ``torchrun`` every rank embeds images ``rank, rank + world_size, ...`` (read from the
RANK / WORLD_SIZE environment variables) and writes its own shards, so ranks never share a file.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capret.cli.common import add_debug_flag, print_json, run_guarded
from capret.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capret-extract",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="model folder, checkpoint or run folder")
    p.add_argument("--images", type=Path, required=True, help="image folder or text file of image paths")
    p.add_argument("--captions", type=Path, default=None, help="caption store JSONL joined by image id")
    p.add_argument("--out", type=Path, required=True, help="output folder for the feature shards")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--shard-size", type=int, default=50_000, help="rows per .npy shard")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: auto)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="autocast precision (default fp32)",
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available else cpu)"
    )
    add_debug_flag(p)
    return p


def list_images(source: Path) -> tuple[list[Path], list[str]]:
    """Image paths and ids from a folder or a list file (see the module docstring)."""
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}")
        return paths, [str(p.relative_to(source).with_suffix("")) for p in paths]
    if not source.is_file():
        raise FileNotFoundError(f"--images {source} is neither a folder nor a list file")
    paths, ids = [], []
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        path_text, _, ident = line.partition("\t")
        path = Path(path_text.strip())
        if not path.is_absolute():
            path = source.parent / path
        if not path.is_file():
            raise FileNotFoundError(f"{source}:{number}: image {path} does not exist")
        paths.append(path)
        ids.append(ident.strip() or path_text.strip())
    if not paths:
        raise ValueError(f"--images {source} lists no image")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--images {source}: image ids are not unique")
    return paths, ids


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from capret.data.captions import load_caption_map
    from capret.inference.dualstream import load_model

    if args.batch_size < 1 or args.shard_size < 1:
        raise ConfigError(
            f"--batch-size and --shard-size must be >= 1 (got {args.batch_size}, {args.shard_size})"
        )
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if device is None:
        import torch

        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    paths, ids = list_images(args.images)
    paths, ids = paths[rank::world_size], ids[rank::world_size]
    captions = None
    missing = 0
    if args.captions is not None:
        table = load_caption_map(args.captions)
        captions = [table.get(i) for i in ids]
        missing = sum(c is None for c in captions)
    model = load_model(args.checkpoint, device=device)
    args.out.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, start in enumerate(range(0, len(paths), args.shard_size)):
        stop = start + args.shard_size
        feats = model.encode_images(
            paths[start:stop],
            None if captions is None else captions[start:stop],
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            precision=args.precision,
            progress=rank == 0,
        )
        name = f"r{rank}_{shard:05d}"
        tmp = args.out / f"features_{name}.tmp.npy"
        np.save(tmp, feats)
        tmp.replace(args.out / f"features_{name}.npy")
        (args.out / f"ids_{name}.txt").write_text("\n".join(ids[start:stop]) + "\n")
        shards.append({"features": f"features_{name}.npy", "ids": f"ids_{name}.txt", "rows": len(feats)})
    manifest = {
        "checkpoint": str(args.checkpoint),
        "rank": rank,
        "world_size": world_size,
        "images": len(paths),
        "dim": model.embed_dim,
        "captions": None if captions is None else {"found": len(ids) - missing, "missing": missing},
        "shards": shards,
    }
    (args.out / f"manifest_r{rank}.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body(a: argparse.Namespace) -> int:
        print_json(_run(a))
        return 0

    return run_guarded(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
