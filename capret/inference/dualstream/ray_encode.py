"""``capret-extract --engine ray``: image (+ caption) embedding as a Ray Data job, rows back in input order.

Each actor loads the model once (``load_model``, on its own device) and embeds batches of inputs with
:meth:`~capret.inference.dualstream.encoding.RetrievalModel.encode_images`, the local engine's own call, so the
features equal the local engine's (allclose). The driver receives rows in input order (Ray Data's
``preserve_order``) and writes the shards itself, so the extraction folder keeps its one writer and its atomic
manifest. ``ray.init()`` starts a local Ray unless ``address`` names a cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["encode_on_ray"]


class _EncodeActor:
    """One Ray actor: the model loaded once, embedding batches of ``{"job": json}`` rows."""

    def __init__(self, *, checkpoint: str, device: str | None, precision: str, skip_bad: bool) -> None:
        from capret.inference.dualstream.encoding import load_model

        self.model = load_model(checkpoint, device=device)
        self.precision, self.skip_bad = precision, skip_bad

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        jobs = [json.loads(str(text)) for text in batch["job"]]
        captions = [job["caption"] for job in jobs]
        bad: list[tuple[int, str]] | None = [] if self.skip_bad else None
        vectors = self.model.encode_images(
            [job["path"] for job in jobs],
            captions if any(c is not None for c in captions) else None,
            batch_size=len(jobs),
            num_workers=0,
            precision=self.precision,
            bad_images=bad,
        )
        reasons = [""] * len(jobs)
        for index, reason in bad or []:
            reasons[index] = reason or "unreadable image"
        return {
            "index": np.asarray([job["index"] for job in jobs], dtype=np.int64),
            "vector": np.asarray(vectors, dtype=np.float32),
            "bad": np.asarray(reasons, dtype=object),
        }


def encode_on_ray(
    checkpoint: str | Path,
    paths: Sequence[str | Path],
    captions: Sequence[str | None] | None,
    *,
    batch_size: int = 64,
    precision: str = "fp32",
    device: str | None = None,
    skip_bad: bool = False,
    actors: int = 2,
    address: str | None = None,
    num_cpus: int | None = None,
) -> Iterator[tuple[int, np.ndarray, str]]:
    """Yield ``(input index, feature row, bad-image reason or "")`` for every input, in input order."""
    from captioning.ray_engine import init_ray

    ray = init_ray(address=address, num_cpus=num_cpus)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    items = [
        {
            "job": json.dumps(
                {"index": i, "path": str(p), "caption": None if captions is None else captions[i]}
            )
        }
        for i, p in enumerate(paths)
    ]
    dataset = ray.data.from_items(items).map_batches(
        _EncodeActor,
        fn_constructor_kwargs={
            "checkpoint": str(checkpoint),
            "device": device,
            "precision": precision,
            "skip_bad": skip_bad,
        },
        batch_size=int(batch_size),
        batch_format="numpy",
        concurrency=max(1, int(actors)),
        num_cpus=1,
    )
    expected = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for index, vector, reason in zip(batch["index"], batch["vector"], batch["bad"]):
            if int(index) != expected:
                raise RuntimeError(f"Ray returned input {int(index)} where {expected} was due")
            expected += 1
            yield int(index), np.asarray(vector, dtype=np.float32), str(reason or "")
    if expected != len(paths):
        raise RuntimeError(f"Ray returned {expected} of {len(paths)} inputs")
