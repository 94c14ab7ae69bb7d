"""``capret-caption --engine ray``: the same captioning runner as Ray Data actors; the store stays in the driver.

The local engine (:func:`captioning.runner.caption_targets`) runs the dialogue in this process. The Ray engine
runs *the same function* inside Ray Data actors -- each actor builds the caption backend once (a local VLM/LLM,
or the OpenAI-compatible client of served models) -- over batches of the items the store does not hold yet, and
hands the finished records back to the driver, which alone appends them to the caption store (and the failures
to the failures file) as batches arrive. So the store keeps its guarantees: one writer holding the lock, whole
lines only, each key once. A killed job (driver or cluster) loses only the batches not yet appended; the rerun
asks the store what is missing and captions each missing item once.

``ray.init()`` starts a local Ray with ``num_cpus`` CPUs when no ``address`` is given (the same code runs on a
cluster with ``--ray-address``). Ray is an optional dependency: ``pip install 'capret[ray]'``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from capret.errors import MissingDependencyError
from captioning.category import CategoryModel, CategoryPrediction
from captioning.loop import LoopConfig
from captioning.prompts import PromptSet
from captioning.runner import RunSummary, start_run
from captioning.sources import CaptionTarget

__all__ = ["caption_targets_ray", "init_ray"]


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> Any:
    """Import and start Ray once (a local instance unless ``address``); returns the ``ray`` module."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "--engine ray needs Ray Data: pip install 'capret[ray]' (or pip install 'ray[data]')"
        ) from None
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=num_cpus, **options)
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


class _CollectingStore:
    """What :func:`caption_targets` needs of a store, collecting instead of writing (the driver writes)."""

    overwrite = True  # the driver already left out the keys its store holds
    truncated_tail = b""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []

    def __contains__(self, key: object) -> bool:
        return False

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        self.records.extend(records)

    def append_failures(self, failures: Sequence[dict[str, Any]]) -> None:
        self.failures.extend(failures)


class _CaptionActor:
    """One Ray actor: a caption backend built once, captioning batches of target indices."""

    def __init__(
        self,
        *,
        targets: Sequence[CaptionTarget],
        backend: str,
        options: dict[str, Any],
        prompts: PromptSet,
        config: LoopConfig,
        on_bad_image: str,
        category_model: CategoryModel | None,
        cross_fitted: Mapping[str, CategoryPrediction] | None,
        oracle: bool,
    ) -> None:
        from captioning.backends import create_backend

        self.targets = list(targets)
        self.backend = create_backend(backend, **options)
        self.prompts, self.config, self.on_bad_image = prompts, config, on_bad_image
        self.category_model, self.cross_fitted, self.oracle = category_model, cross_fitted, oracle

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from captioning.runner import caption_targets

        chosen = [self.targets[int(i)] for i in batch["id"]]
        store = _CollectingStore()
        summary = caption_targets(
            chosen,
            store=store,  # type: ignore[arg-type]
            backend=self.backend,
            prompts=self.prompts,
            config=self.config,
            batch_size=len(chosen),
            progress=False,
            on_bad_image=self.on_bad_image,
            category_model=self.category_model,
            cross_fitted=self.cross_fitted,
            oracle=self.oracle,
        )
        return {
            "records": [json.dumps(store.records)],
            "failures": [json.dumps(store.failures)],
            "summary": [json.dumps(summary.to_dict())],
        }


def caption_targets_ray(
    targets: Sequence[CaptionTarget],
    *,
    store: Any,
    backend: str,
    options: dict[str, Any],
    prompts: PromptSet,
    config: LoopConfig,
    batch_size: int = 8,
    actors: int = 2,
    address: str | None = None,
    num_cpus: int | None = None,
    on_bad_image: str = "error",
    category_model: CategoryModel | None = None,
    cross_fitted: Mapping[str, CategoryPrediction] | None = None,
    oracle: bool = False,
) -> RunSummary:
    """Caption every target ``store`` does not hold, on Ray Data actors; the driver appends (see the module
    docstring). Returns the same :class:`RunSummary` as the local engine."""
    import time

    start = time.perf_counter()
    summary, todo = start_run(targets, store, oracle=oracle)
    if todo:
        ray = init_ray(address=address, num_cpus=num_cpus)
        # items from the driver, not a read task: a read task would need a CPU the actors already hold
        dataset = ray.data.from_items([{"id": i} for i in range(len(todo))])
        dataset = dataset.map_batches(
            _CaptionActor,
            fn_constructor_kwargs={
                "targets": todo,
                "backend": backend,
                "options": options,
                "prompts": prompts,
                "config": config,
                "on_bad_image": on_bad_image,
                "category_model": category_model,
                "cross_fitted": cross_fitted,
                "oracle": oracle,
            },
            batch_size=batch_size,
            concurrency=max(1, int(actors)),
            num_cpus=1,
        )
        reasons: dict[str, int] = {}
        for batch in dataset.iter_rows():
            records = json.loads(batch["records"])
            failures = json.loads(batch["failures"])
            part = json.loads(batch["summary"])
            store.append(records)
            store.append_failures(failures)
            summary.done += part["done"]
            summary.failed += part["failed"]
            summary.prompt_tokens += part["prompt_tokens"]
            summary.completion_tokens += part["completion_tokens"]
            summary.bad_images += part["bad_images"]
            summary.bad_image_files.extend(part["bad_image_files"])
            for reason, count in part["failure_reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
            if records and not summary.example:
                summary.example = records[0]["caption"]
        summary.failure_reasons = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    summary.seconds = round(time.perf_counter() - start, 3)
    summary.items_per_second = round(summary.done / summary.seconds, 3) if summary.seconds > 0 else 0.0
    return summary
