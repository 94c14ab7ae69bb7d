"""Quickstart stage ``captions``: caption every demo item (both splits) with the model-free template backend.

The demo dataset has the DeepFashion2 layout, so captions are keyed by ``Item.key`` exactly like real
DeepFashion2 captions and the training stages join them the same way. The store is resumable: re-running the
quickstart skips items already captioned.
"""

from __future__ import annotations

from typing import Any

from captioning.backends import create_backend
from captioning.loop import LoopConfig
from captioning.prompts import get_prompt_set
from captioning.runner import caption_targets
from captioning.sources import create_source
from captioning.store import CaptionStore

from . import QuickstartContext

SPLITS = ("train", "validation")


def run(ctx: QuickstartContext) -> dict[str, Any]:
    """Caption the demo items into ``ctx.out_dir / "captions.jsonl"``; sets ``ctx.state["captions"]``."""
    path = ctx.out_dir / "captions.jsonl"
    prompts = get_prompt_set("capret-chat-v1")
    captioned = skipped = failed = 0
    example = ""
    with CaptionStore(path) as store, create_backend("template") as backend:
        for split in SPLITS:
            if not (ctx.data_root / split).is_dir():
                continue
            targets = create_source("demo", root=ctx.data_root, split=split)
            summary = caption_targets(
                targets, store=store, backend=backend, prompts=prompts, config=LoopConfig(), batch_size=32
            )
            captioned += summary.done
            skipped += summary.skipped
            failed += summary.failed
            example = example or summary.example
    if not example:
        from captioning.store import read_captions

        example = next(iter(read_captions(path).values()), "")
    ctx.state["captions"] = path
    return {"captioned": captioned, "skipped": skipped, "failed": failed, "example": example}
