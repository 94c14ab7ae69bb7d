"""Quickstart stage ``captions``: caption every demo item (both splits) with the model-free template backend.

The demo dataset has the DeepFashion2 layout, so captions are keyed by ``Item.key`` exactly like real
DeepFashion2 captions and the training stages join them the same way. Like DeepFashion2, the demo numbers
images from 1 in every split, so ``Item.key`` repeats across splits: each split gets its own store
(``captions.train.jsonl``, ``captions.validation.jsonl``) and ``ctx.state["captions"]`` maps split -> path.
The stores are resumable: re-running the quickstart skips items already captioned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from captioning.backends import create_backend
from captioning.loop import LoopConfig
from captioning.prompts import get_prompt_set
from captioning.runner import caption_targets
from captioning.sources import create_source, store_binding
from captioning.store import CaptionStore, read_captions

from . import QuickstartContext

SPLITS = ("train", "validation")


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Caption the demo items into ``ctx.out_dir / "captions.<split>.jsonl"``; sets ``ctx.state["captions"]``
    to ``{split: path}``."""
    prompts = get_prompt_set("capret-chat-v1")
    captioned = skipped = failed = 0
    example = ""
    stores: dict[str, Path] = {}
    with create_backend("template") as backend:
        for split in SPLITS:
            if not (ctx.data_root / split).is_dir():
                continue
            path = ctx.out_dir / f"captions.{split}.jsonl"
            targets = create_source("demo", root=ctx.data_root, split=split)
            with CaptionStore(path, binding=store_binding("demo", split, targets)) as store:
                summary = caption_targets(
                    targets, store=store, backend=backend, prompts=prompts, config=LoopConfig(), batch_size=32
                )
            stores[split] = path
            captioned += summary.done
            skipped += summary.skipped
            failed += summary.failed
            example = example or summary.example or next(iter(read_captions(path).values()), "")
    if not stores:
        raise FileNotFoundError(f"no demo split ({', '.join(SPLITS)}) under {ctx.data_root}")
    ctx.state["captions"] = stores
    return {
        "captioned": captioned,
        "skipped": skipped,
        "failed": failed,
        "example": example,
        "stores": {split: str(path) for split, path in stores.items()},
    }
