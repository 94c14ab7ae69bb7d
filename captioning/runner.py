"""Caption a list of targets into a :class:`~captioning.store.CaptionStore`, resumably.

The runner skips keys the store already holds (unless overwriting), opens the next batch's images in a
background thread while the current batch is in the dialogue, writes each finished batch atomically and logs
failed items (missing image, failed request, empty summary) to the failures file so the next run retries
them. A tqdm bar shows rate and ETA; the returned :class:`RunSummary` is what ``capret-caption`` prints.

What the dialogue is told about an item is decided here, once: by default only the pixels, the box and a
*predicted* category (a detector's class on the target, else the ``category_model``'s prediction from the
crop, else none); the target's annotation (category, viewpoint, occlusion, scale, zoom) only with
``oracle=True``. Every record says which (``"oracle"``, ``"caption_source"``, ``"category"``), so oracle
captions can never pass for pixel ones downstream.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from capret.data.imagefile import check_bad_image_policy
from capret.errors import BadImageError, ConfigError
from captioning.backends.base import CaptionBackend
from captioning.category import CategoryModel, CategoryPrediction
from captioning.loop import CaptionResult, CaptionTask, LoopConfig, caption_batch
from captioning.prompts import PromptSet
from captioning.sources import CaptionTarget
from captioning.store import CaptionStore, utc_now

__all__ = ["ORACLE_ATTRIBUTES", "RunSummary", "caption_source", "caption_targets", "make_task", "start_run"]

#: Annotation fields the oracle hands to the dialogue (besides the category name).
ORACLE_ATTRIBUTES = ("viewpoint", "occlusion", "scale", "zoom_in")


def caption_source(*, oracle: bool) -> str:
    """The ``caption_source`` written into records and reports."""
    return "oracle-attributes" if oracle else "pixels"


def start_run(
    targets: Sequence[CaptionTarget], store: Any, *, oracle: bool
) -> tuple[RunSummary, list[CaptionTarget]]:
    """A run's summary before any captioning (targets, repaired tail, caption source, skipped) and the targets
    still to caption: those ``store`` does not hold, or all with ``store.overwrite``. Shared by the local and
    the Ray engine so both count the same way."""
    summary = RunSummary(
        total=len(targets),
        truncated_tail_bytes=len(store.truncated_tail),
        caption_source=caption_source(oracle=oracle),
    )
    todo = [t for t in targets if store.overwrite or t.key not in store]
    summary.skipped = len(targets) - len(todo)
    return summary, todo


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
    caption_source: str = "pixels"  # "pixels" (default) or "oracle-attributes" (annotation fields were used)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reason_class(error: str) -> str:
    """Group failure messages for the summary: drop response bodies, file names and round numbers."""
    text = re.sub(r"(HTTP \d{3}): .*", r"\1", error)
    text = re.sub(r"\(round \d+\)", "", text)
    text = re.sub(r"(cannot open image): .*", r"\1", text)
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:160] + "..."


def _load(targets: Sequence[CaptionTarget]) -> list[Image.Image | BadImageError]:
    """Open the images of a batch; a target that cannot be opened gives its error instead (the policy decides)."""
    out: list[Image.Image | BadImageError] = []
    for target in targets:
        try:
            out.append(target.open_image())
        except BadImageError as exc:  # missing/corrupt image files
            out.append(exc)
        except (OSError, ValueError) as exc:
            out.append(BadImageError(f"cannot open image ({exc})", path=getattr(exc, "filename", None)))
    return out


def make_task(
    target: CaptionTarget, image: Image.Image, *, oracle: bool, predicted: CategoryPrediction | None
) -> tuple[CaptionTask, dict[str, Any]]:
    """The dialogue's view of one item and the record's ``category`` provenance (see the module docstring)."""
    if oracle:
        annotation = target.annotation
        category = str(annotation.get("category_name", ""))
        attributes = {k: annotation[k] for k in ORACLE_ATTRIBUTES if k in annotation}
        category_id = annotation.get("category_id")
        task = CaptionTask(key=target.key, image=image, bbox=target.bbox, category=category,
                           category_id=int(category_id) if category_id is not None else None,
                           attributes=attributes)  # fmt: skip
        return task, {"name": category, "source": "annotation"}
    if target.category:
        info: dict[str, Any] = {"name": target.category, "source": "detector"}
    elif predicted is not None:
        info = {"name": predicted.name, "source": "category-model", "score": round(predicted.score, 4)}
    else:
        info = {"name": "", "source": "none"}
    return CaptionTask(key=target.key, image=image, bbox=target.bbox, category=info["name"]), info


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
    category_model: CategoryModel | None = None,
    cross_fitted: Mapping[str, CategoryPrediction] | None = None,
    oracle: bool = False,
) -> RunSummary:
    """Caption every target not yet in ``store`` (the store must be open); see the module docstring.

    Args:
        on_bad_image: ``"error"`` stops at the first image that cannot be read (raising ``BadImageError`` naming
            it, after the batches before it were stored); ``"skip"`` logs it to the failures file, counts it in
            ``bad_images`` and lists it in ``bad_image_files``.
        category_model: predicts the category named in the prompts of targets without a detector class.
        cross_fitted: key -> out-of-fold prediction, used instead of ``category_model`` for the items the
            model was trained on (:func:`captioning.category_mlp.cross_fitted_predictions`).
        oracle: hand the annotation (category, viewpoint, occlusion, scale, zoom) to the dialogue instead;
            the records say so.
    """
    check_bad_image_policy(on_bad_image)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    summary, todo = start_run(targets, store, oracle=oracle)
    reasons: Counter[str] = Counter()
    model = backend.describe()
    if category_model is not None and not oracle:
        model = {**model, "category_model": category_model.describe()}
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="captioning", unit="item", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="capret-images") as pool:
        upcoming: Future[list[Image.Image | BadImageError]] | None = (
            pool.submit(_load, batches[0]) if batches else None
        )
        for index, batch in enumerate(batches):
            assert upcoming is not None
            loaded = upcoming.result()
            upcoming = pool.submit(_load, batches[index + 1]) if index + 1 < len(batches) else None
            broken = [x for x in loaded if isinstance(x, BadImageError)]
            if broken and on_bad_image == "error":
                raise broken[0]
            opened = [(t, x) for t, x in zip(batch, loaded) if isinstance(x, Image.Image)]
            predictions: list[CategoryPrediction | None] = [None] * len(opened)
            if category_model is not None and not oracle:
                predictions = list(
                    category_model.predict([x for _, x in opened], [t.bbox for t, _ in opened])
                )
            out_of_fold = {t.key for t, _ in opened if cross_fitted and not oracle and t.key in cross_fitted}
            tasks, categories = [], {}
            for (target, image), predicted in zip(opened, predictions):
                if target.key in out_of_fold:
                    assert cross_fitted is not None
                    predicted = cross_fitted[target.key]
                task, categories[target.key] = make_task(target, image, oracle=oracle, predicted=predicted)
                if target.key in out_of_fold and categories[target.key]["source"] == "category-model":
                    categories[target.key]["cross_fitted"] = True
                tasks.append(task)
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
                            "oracle": oracle,
                            "caption_source": summary.caption_source,
                            "category": categories[result.key],
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
