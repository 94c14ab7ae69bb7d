"""Caption a list of targets into a :class:`~captioning.store.CaptionStore`, resumably.

The runner skips keys the store already holds (unless overwriting), opens the next batch's images in a
background thread while the current batch is in the dialogue, writes each finished batch atomically and logs
failed items (missing image, failed request, empty summary) to the failures file so the next run retries
them. A tqdm bar shows rate and ETA; the returned :class:`RunSummary` is what ``capret-caption`` prints.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from capret.data.imagefile import check_bad_image_policy
from capret.errors import BadImageError
from captioning.backends.base import CaptionBackend
from captioning.loop import CaptionResult, CaptionTask, LoopConfig, caption_batch
from captioning.prompts import PromptSet
from captioning.sources import CaptionTarget
from captioning.store import CaptionStore, utc_now

__all__ = ["RunSummary", "caption_targets"]


@dataclass
class RunSummary:
    """Counts of one run. ``failure_reasons`` maps a reason (without the per-item detail) to its count."""

    total: int = 0  # targets considered (after sharding and --limit)
    done: int = 0  # captioned in this run
    skipped: int = 0  # already in the store
    failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    items_per_second: float = 0.0
    truncated_tail_bytes: int = 0  # size of a torn last line repaired on open (0 = file was clean)
    bad_images: int = 0  # images that could not be read, skipped under on_bad_image="skip"
    bad_image_files: list[str] = field(default_factory=list)  # each skipped file (also in the failures log)
    example: str = ""  # one caption of this run, for a quick look

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reason_class(error: str) -> str:
    """Group failure messages for the summary: drop response bodies, file names and round numbers."""
    text = re.sub(r"(HTTP \d{3}): .*", r"\1", error)
    text = re.sub(r"\(round \d+\)", "", text)
    text = re.sub(r"(cannot open image): .*", r"\1", text)
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:160] + "..."


def _load(targets: Sequence[CaptionTarget]) -> list[CaptionTask | BadImageError]:
    """Open the images of a batch; a target that cannot be opened gives its error instead."""
    out: list[CaptionTask | BadImageError] = []
    for target in targets:
        try:
            image = target.open_image()
        except BadImageError as exc:  # missing/corrupt image files: the policy decides
            out.append(exc)
            continue
        except OSError as exc:
            out.append(BadImageError(f"cannot open image ({exc})", path=getattr(exc, "filename", None)))
            continue
        out.append(
            CaptionTask(
                key=target.key,
                image=image,
                bbox=target.bbox,
                category=target.category,
                category_id=target.category_id,
                attributes=dict(target.attributes),
            )
        )
    return out


def caption_targets(
    targets: Sequence[CaptionTarget],
    *,
    store: CaptionStore,
    backend: CaptionBackend,
    prompts: PromptSet,
    config: LoopConfig,
    batch_size: int = 8,
    progress: bool = True,
    on_bad_image: str = "error",
) -> RunSummary:
    """Caption every target not yet in ``store`` (the store must be open); see the module docstring.

    ``on_bad_image="error"`` stops at the first image that cannot be read (raising ``BadImageError`` naming
    it, after the batches before it were stored); ``"skip"`` logs it to the failures file, counts it in
    ``bad_images`` and lists it in ``bad_image_files``.
    """
    check_bad_image_policy(on_bad_image)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    summary = RunSummary(total=len(targets), truncated_tail_bytes=len(store.truncated_tail))
    todo = [t for t in targets if store.overwrite or t.key not in store]
    summary.skipped = len(targets) - len(todo)
    reasons: Counter[str] = Counter()
    model = backend.describe()
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="captioning", unit="item", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="capret-images") as pool:
        upcoming: Future[list[CaptionTask | BadImageError]] | None = (
            pool.submit(_load, batches[0]) if batches else None
        )
        for index, batch in enumerate(batches):
            assert upcoming is not None
            loaded = upcoming.result()
            upcoming = pool.submit(_load, batches[index + 1]) if index + 1 < len(batches) else None
            broken = [x for x in loaded if isinstance(x, BadImageError)]
            if broken and on_bad_image == "error":
                raise broken[0]
            tasks = [x for x in loaded if isinstance(x, CaptionTask)]
            results: dict[str, CaptionResult] = {}
            if tasks:
                for result in caption_batch(tasks, backend=backend, prompts=prompts, config=config):
                    results[result.key] = result
            for target, item in zip(batch, loaded):
                if isinstance(item, BadImageError):
                    results[target.key] = CaptionResult(key=target.key, error=f"cannot open image: {item}")
                    summary.bad_images += 1
                    summary.bad_image_files.append(str(item.path) if item.path else str(item))
            records: list[dict[str, Any]] = []
            failures: list[dict[str, Any]] = []
            now = utc_now()
            for target in batch:  # keep dataset order in the file
                result = results[target.key]
                summary.prompt_tokens += result.prompt_tokens
                summary.completion_tokens += result.completion_tokens
                if result.ok:
                    records.append(
                        {
                            "key": result.key,
                            "caption": result.caption,
                            "dialogue": [qa.to_dict() for qa in result.dialogue],
                            "backend": backend.name,
                            "model": model,
                            "prompt_version": prompts.version,
                            "created": now,
                        }
                    )
                else:
                    error = result.error or "unknown error"
                    reasons[_reason_class(error)] += 1
                    failures.append(
                        {
                            "key": result.key,
                            "reason": error,
                            "dialogue": [qa.to_dict() for qa in result.dialogue],
                            "backend": backend.name,
                            "created": now,
                        }
                    )
            store.append(records)
            store.append_failures(failures)
            summary.done += len(records)
            summary.failed += len(failures)
            if records and not summary.example:
                summary.example = records[0]["caption"]
            bar.update(len(batch))
            bar.set_postfix(done=summary.done, failed=summary.failed, refresh=False)
    bar.close()
    summary.failure_reasons = dict(reasons.most_common())
    summary.seconds = round(time.perf_counter() - start, 3)
    summary.items_per_second = round(summary.done / summary.seconds, 3) if summary.seconds > 0 else 0.0
    return summary
