"""``capret catalogue add --engine ray``: the catalogue's model stages as Ray Data actors; the writer stays here.

Each actor builds :class:`~capret.catalogue.stages.ItemStages` once from the catalogue's settings (detector,
captioner, model: CPU actors here, GPU actors on a cluster with ``num_gpus``) and turns batches of photos into
row tables, exactly as the local engine does. The driver -- the process holding the catalogue's writer lock --
receives the tables and commits them; it commits only photos whose rows have all arrived (each row carries its
photo's row count), so a table split by Ray never commits half a photo, and a killed job leaves whole photos
that the rerun reports as present. Captions are kept in each actor's memory: the catalogue's caption store has
one writer, and a photo is captioned again only if its rows never reached the table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from capret.catalogue.ingest import register_engine
from capret.catalogue.schema import CatalogueSettings
from capret.catalogue.stages import ImageJob, ItemStages
from capret.catalogue.table import Catalogue

__all__ = ["RayEngine"]

_ROWS_OF_PHOTO = "_photo_rows"


class _StagesActor:
    """A Ray actor holding the catalogue's stages; returns rows plus each row's photo row count."""

    def __init__(self, *, settings: dict[str, Any], device: str | None) -> None:
        self.stages = ItemStages(CatalogueSettings(**settings), caption_cache=None, device=device)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        jobs = [ImageJob.from_dict(json.loads(str(text))) for text in batch["job"]]
        rows = self.stages.rows(jobs)
        images = rows.column("image").to_pylist()
        counts = {name: images.count(name) for name in set(images)}
        return rows.append_column(_ROWS_OF_PHOTO, pa.array([counts[n] for n in images], pa.int32()))


@register_engine("ray")
class RayEngine:
    """The model stages on Ray Data actors (a local Ray with ``num_cpus`` CPUs, or the cluster at ``address``)."""

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        actors: int = 1,
        num_gpus: float = 0.0,
        device: str | None = None,
    ) -> None:
        self.address, self.num_cpus, self.actors = address, num_cpus, int(actors)
        self.num_gpus, self.device = float(num_gpus), device

    def rows(
        self, catalogue: Catalogue, jobs: Sequence[ImageJob], *, batch_images: int
    ) -> Iterator[pa.Table]:
        from dataclasses import asdict

        from captioning.ray_engine import init_ray

        ray = init_ray(address=self.address, num_cpus=self.num_cpus)
        # one JSON column: Ray Data would turn a missing box into NaN and nested lists into arrays
        dataset = ray.data.from_items([{"job": json.dumps(job.to_dict())} for job in jobs])
        dataset = dataset.map_batches(
            _StagesActor,
            fn_constructor_kwargs={"settings": asdict(catalogue.settings), "device": self.device},
            batch_size=int(batch_images),
            batch_format="numpy",
            concurrency=max(1, self.actors),
            num_cpus=1,
            num_gpus=self.num_gpus or None,
        )
        pending: list[pa.Table] = []
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            pending.append(block)
            table = pa.concat_tables(pending)
            complete, rest = _split_complete(table)
            pending = [rest] if rest.num_rows else []
            if complete.num_rows:
                yield complete.drop_columns([_ROWS_OF_PHOTO])
        if pending:  # cannot happen unless an actor lost rows: refuse rather than commit half a photo
            names = sorted(set(pending[0].column("image").to_pylist()))
            raise RuntimeError(f"Ray returned incomplete rows for photos {names[:3]}")

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _split_complete(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Rows of photos whose rows have all arrived, and the rest."""
    images = table.column("image").to_pylist()
    expected = table.column(_ROWS_OF_PHOTO).to_pylist()
    seen: dict[str, int] = {}
    for name in images:
        seen[name] = seen.get(name, 0) + 1
    done = [seen[name] == count for name, count in zip(images, expected)]
    mask = pa.array(done)
    return table.filter(mask), table.filter(pc.invert(mask))
