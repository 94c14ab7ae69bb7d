"""The FashionIQ, CIRR and CIRCO protocols, once: ``evaluate_cir(method, benchmark)``.

``capret-eval cir``, the ``combiner`` task's validation (model selection) and the benchmark scripts all call
:func:`evaluate_cir`, so the numbers they report cannot drift apart. A :class:`CirBenchmark` holds what differs
between the benchmarks, as thin adapters around the shared search (:func:`capret.inference.cir.methods.
search_methods`) and the pure metric functions (:mod:`capret.evaluation.cir`):

=========== =============================== =================== ====================================================
benchmark   units (one ranked gallery each) reference           metrics (val) / files (test)
=========== =============================== =================== ====================================================
fashioniq   one per category                kept (CLIP4Cir)     R@10/50 per category, averages, ``average``;
                                                                test: the top-50 rankings per category
cirr        the split                       removed             R@1/5/10/50, Recall_subset@1/2/3, ``r5_rs1_mean``;
                                                                test1: the server's recall / recall_subset files
circo       the whole gallery               kept (SEARLE)       mAP@5/10/25/50; test: the server's submission
=========== =============================== =================== ====================================================

Queries are :class:`~capret.inference.cir.methods.CirQuerySet` (reference, relative caption, every caption order);
FashionIQ captions are paired ``"C1 and c2"`` (CLIP4Cir) and SEARLE-style methods average both orders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capret.config import ConfigError
from capret.data import create_dataset
from capret.errors import MissingFileError
from capret.evaluation.cir import (
    circo_metrics,
    cirr_metrics,
    fashioniq_recall,
    write_circo_submission,
    write_cirr_submission,
)
from capret.inference.cir.methods import BASELINES, CirMethod, CirQuerySet, baseline, search_methods
from capret.inference.cir.search import (
    TOP_K,
    CIRRanking,
    FeatureOptions,
    circo_ids,
    cirr_with_members,
    image_refs,
    rerank_cir,
)
from capret.io import atomic_write_json
from capret.registry import Registry

__all__ = [
    "SPLITS",
    "BenchmarkUnit",
    "CirBenchmark",
    "CirEvaluation",
    "RerankSpec",
    "circo_benchmark",
    "circo_query_set",
    "cirr_benchmark",
    "cirr_query_set",
    "evaluate_cir",
    "fashioniq_benchmark",
    "fashioniq_query_set",
    "list_cir_benchmarks",
    "open_benchmark",
]

#: the splits ``capret-eval cir`` evaluates (val has public targets; the others go to the evaluation servers);
#: :func:`open_benchmark` also opens a training split (the metrics then score it), as the datasets allow
SPLITS: dict[str, tuple[str, ...]] = {
    "fashioniq": ("val", "test"),
    "cirr": ("val", "test", "test1"),
    "circo": ("val", "test"),
}

#: the key of the evaluated method among the ranked ones (beside the baselines)
_METHOD = "method"


# ------------------------------------------------------------------------------------------- query sets


def fashioniq_query_set(dataset: Any) -> CirQuerySet:
    """Queries of one FashionIQ category: captions paired "C1 and c2" plus both lower-case orders."""
    triplets = dataset.triplets
    orders: list[tuple[str, ...]] = []
    for t in triplets:
        c1, c2 = (c.strip(".?, ") for c in t.captions)
        orders.append((f"{c1} and {c2}", f"{c2} and {c1}"))
    return CirQuerySet(
        dataset=f"fashioniq/{dataset.category}",
        references=[t.reference for t in triplets],
        captions=[t.caption for t in triplets],
        caption_orders=orders,
        load_image=dataset.load_image,
    )


def cirr_query_set(dataset: Any) -> CirQuerySet:
    """CIRR queries: one caption per triplet."""
    triplets = dataset.triplets
    return CirQuerySet(
        dataset="cirr",
        references=[t.reference for t in triplets],
        captions=[t.caption for t in triplets],
        caption_orders=[(t.caption,) for t in triplets],
        load_image=dataset.load_image,
    )


def circo_query_set(dataset: Any) -> CirQuerySet:
    """CIRCO queries; image names are COCO ids as strings (the gallery's names)."""
    queries = dataset.queries
    return CirQuerySet(
        dataset="circo",
        references=[str(q.reference) for q in queries],
        captions=[q.caption for q in queries],
        caption_orders=[(q.caption,) for q in queries],
        load_image=lambda name: dataset.load_image(int(name)),
    )


# ------------------------------------------------------------------------------------------- benchmarks


@dataclass
class BenchmarkUnit:
    """One ranked gallery: a FashionIQ category, or the CIRR / CIRCO split."""

    name: str
    dataset: Any
    queries: CirQuerySet
    gallery: list[str]
    #: the query's own reference never appears in its ranking (CIRR)
    exclude_reference: bool
    #: the global ranking -> what the benchmark's metric and server writers take
    convert: Callable[[CIRRanking], Any]


@dataclass
class CirBenchmark:
    """A benchmark split as :func:`evaluate_cir` runs it: its units and how their rankings are scored."""

    name: str  # fashioniq | cirr | circo
    split: str
    units: list[BenchmarkUnit]
    #: rankings per unit (as ``BenchmarkUnit.convert`` gives them) -> metrics; None when there are no targets
    score: Callable[[list[Any]], dict[str, float]] | None
    #: final rankings per unit, output folder -> the evaluation server's files (test splits)
    server_files: Callable[[list[Any], Path], list[str]]
    #: which gallery each unit ranked, recorded in every output (the CIRR choice changes every number)
    gallery: dict[str, Any]

    @property
    def has_targets(self) -> bool:
        return self.score is not None


def fashioniq_benchmark(datasets: Sequence[Any]) -> CirBenchmark:
    """FashionIQ: one unit per category dataset, reference kept; on val Recall@10/50 (CLIP4Cir protocol)."""
    if not datasets:
        raise ConfigError("FashionIQ benchmark: no category given")
    split = datasets[0].split
    units = [
        BenchmarkUnit(ds.category, ds, fashioniq_query_set(ds), list(ds.gallery), False, lambda r: r.names)
        for ds in datasets
    ]
    annotations = {u.name: u.dataset.annotations for u in units}
    sizes = {u.name: len(u.gallery) for u in units}

    def score(per_unit: list[Any]) -> dict[str, float]:
        # a category gallery under 50 images is ranked whole: its R@50 is complete (and trivially 1)
        return fashioniq_recall(dict(zip(annotations, per_unit)), annotations, gallery_sizes=sizes)

    def server_files(final: list[Any], out: Path) -> list[str]:
        # no public targets and no server: the rankings themselves
        return [
            str(atomic_write_json(out / f"fashioniq_{u.name}_test_rankings.json",
                                  {str(i): r[:TOP_K] for i, r in enumerate(ranks)}))
            for u, ranks in zip(units, final)
        ]  # fmt: skip

    return CirBenchmark(
        name="fashioniq",
        split=split,
        units=units,
        score=score if split != "test" else None,  # train and val have public targets
        server_files=server_files,
        gallery={"images": "category split", "reference_removed": False, "size": sizes},
    )


def cirr_benchmark(dataset: Any) -> CirBenchmark:
    """CIRR: the whole split with each query's reference removed; the query's remaining ``img_set`` members
    follow its ranking (Recall_subset reads them). ``r5_rs1_mean`` is the paper's model-selection number."""
    unit = BenchmarkUnit(
        "cirr", dataset, cirr_query_set(dataset), list(dataset.gallery), True,
        lambda r: cirr_with_members(r, dataset=dataset),
    )  # fmt: skip

    def score(per_unit: list[Any]) -> dict[str, float]:
        out = cirr_metrics(per_unit[0], dataset.annotations)
        out["r5_rs1_mean"] = (out["recall@5"] + out["recall_subset@1"]) / 2
        return out

    def server_files(final: list[Any], out: Path) -> list[str]:
        if dataset.split != "test1":
            return []
        return [
            str(
                write_cirr_submission(
                    out / f"cirr_{kind}_test1.json", final[0], dataset.annotations, kind=kind
                )
            )
            for kind in ("recall", "recall_subset")
        ]

    return CirBenchmark(
        name="cirr",
        split=dataset.split,
        units=[unit],
        score=score if dataset.split != "test1" else None,  # train and val have public targets
        server_files=server_files,
        gallery={"images": "whole split", "reference_removed": True, "size": len(unit.gallery)},
    )


def circo_benchmark(dataset: Any) -> CirBenchmark:
    """CIRCO: the whole gallery, reference kept (SEARLE's evaluation); mAP@5/10/25/50 on val."""
    unit = BenchmarkUnit(
        "circo", dataset, circo_query_set(dataset), [str(g) for g in dataset.gallery], False,
        lambda r: circo_ids(r, dataset=dataset),
    )  # fmt: skip

    def server_files(final: list[Any], out: Path) -> list[str]:
        return [
            str(write_circo_submission(out / "circo_test.json", final[0], annotations=dataset.annotations))
        ]

    return CirBenchmark(
        name="circo",
        split=dataset.split,
        units=[unit],
        score=(lambda per_unit: circo_metrics(per_unit[0], dataset.annotations))
        if dataset.split == "val"
        else None,
        server_files=server_files,
        gallery={"images": "whole gallery", "reference_removed": False, "size": len(unit.gallery)},
    )


def _circo_gallery(root: Path, given: str | Path | None) -> list[int] | Path | None:
    """The CIRCO gallery: ``given`` ids file, else the COCO image-info file under the root, else every
    ``<id>.jpg`` in the unlabeled image folder."""
    from capret.data.circo import IMAGE_FOLDER, IMAGE_INFO

    if given is not None:
        return Path(given)
    if (root / IMAGE_INFO).is_file():
        return None  # the dataset reads the official image-info file itself
    folder = root / IMAGE_FOLDER
    ids = sorted(int(p.stem) for p in folder.glob("*.jpg") if p.stem.isdigit())
    if not ids:
        raise MissingFileError(
            f"CIRCO gallery: no --gallery-ids, no {root / IMAGE_INFO} and no <id>.jpg images in {folder}"
        )
    return ids


_BENCHMARKS: Registry[CirBenchmark] = Registry("CIR benchmark")


@_BENCHMARKS.register("fashioniq")
def _open_fashioniq(
    *, root: Path, split: str, categories: Sequence[str] | None, gallery_ids: str | Path | None
) -> CirBenchmark:
    from capret.data.fashioniq import CATEGORIES

    if gallery_ids is not None:
        raise ConfigError("gallery ids apply to circo only (FashionIQ ranks each category's split)")
    chosen = list(categories) if categories else list(CATEGORIES)
    return fashioniq_benchmark(
        [create_dataset("fashioniq", root=root, split=split, category=c, caption_mode="eval") for c in chosen]
    )


@_BENCHMARKS.register("cirr")
def _open_cirr(
    *, root: Path, split: str, categories: Sequence[str] | None, gallery_ids: str | Path | None
) -> CirBenchmark:
    if categories or gallery_ids is not None:
        raise ConfigError("categories apply to fashioniq and gallery ids to circo, not to cirr")
    return cirr_benchmark(create_dataset("cirr", root=root, split=split))


@_BENCHMARKS.register("circo")
def _open_circo(
    *, root: Path, split: str, categories: Sequence[str] | None, gallery_ids: str | Path | None
) -> CirBenchmark:
    if categories:
        raise ConfigError("categories apply to fashioniq only, not to circo")
    gallery = _circo_gallery(root, gallery_ids)
    return circo_benchmark(create_dataset("circo", root=root, split=split, gallery_ids=gallery))


def list_cir_benchmarks() -> list[str]:
    return _BENCHMARKS.names()


def open_benchmark(
    name: str,
    *,
    root: str | Path,
    split: str = "val",
    categories: Sequence[str] | None = None,
    gallery_ids: str | Path | None = None,
) -> CirBenchmark:
    """A benchmark split read from its official layout under ``root``.

    Args:
        name: ``fashioniq``, ``cirr`` or ``circo`` (:func:`list_cir_benchmarks`).
        split: one of :data:`SPLITS` of the benchmark (or a training split; each dataset checks its own).
        categories: FashionIQ categories (default all three).
        gallery_ids: CIRCO gallery (a COCO image-info JSON, a JSON id list or a text file).
    """
    return _BENCHMARKS.create(
        name, root=Path(root), split=split, categories=categories, gallery_ids=gallery_ids
    )


# ------------------------------------------------------------------------------------------- evaluation


@dataclass
class RerankSpec:
    """Rerank the top ``topk`` of the method's global ranking with the reranker ``name``."""

    name: str
    topk: int = TOP_K


@dataclass
class CirEvaluation:
    """What one evaluation of one method on one benchmark split gives."""

    benchmark: str
    split: str
    #: val: the benchmark's metrics; with a reranker ``{"before", "after", "rerank", "rerank_topk",
    #: "rerank_seconds"}``; test: ``{}``
    metrics: dict[str, Any]
    #: the shortcut baselines' metrics on the method's CLIP (val, when asked for)
    baselines: dict[str, dict[str, float]]
    #: the evaluation servers' files (test splits, when an output folder was given)
    files: list[str]
    #: which gallery each unit ranked
    gallery: dict[str, Any]
    #: method name (``method`` and the baselines) -> rankings per unit, as the metrics read them
    rankings: dict[str, list[Any]] = field(default_factory=dict)


def _rerank(unit: BenchmarkUnit, result: CIRRanking, spec: RerankSpec) -> tuple[CIRRanking, int, float]:
    """Rerank one unit's global ranking; geometric verification gets the image paths."""
    query_images = gallery_images = None
    if spec.name == "geometric":
        query_images = image_refs(unit.dataset, unit.queries.references)
        gallery_images = image_refs(unit.dataset, result.gallery.names)
    return rerank_cir(
        result,
        reranker=spec.name,
        topk=int(spec.topk),
        query_images=query_images,
        gallery_images=gallery_images,
    )


def evaluate_cir(
    method: CirMethod,
    benchmark: CirBenchmark,
    *,
    baselines: bool = True,
    options: FeatureOptions | None = None,
    rerank: RerankSpec | None = None,
    out: str | Path | None = None,
) -> CirEvaluation:
    """Evaluate ``method`` on ``benchmark`` with the benchmark's own protocol.

    Every unit's gallery is ranked once per method (the shortcut baselines on the method's CLIP when
    ``baselines`` and the split has targets; the images are encoded once for all of them). With ``rerank`` the
    method's top ``rerank.topk`` are reordered and the metrics hold both sides. On a split without public
    targets the method's (reranked) rankings become the server's files under ``out``.

    Args:
        options: feature cache and encoding settings (the Combiner's stage-1 validation turns text caching off).
        out: folder of the server files (test splits); nothing is written when None.
    """
    if rerank is not None and int(rerank.topk) < 1:
        raise ConfigError(f"rerank topk must be >= 1, got {rerank.topk}")
    score = benchmark.score
    methods = {_METHOD: method}
    if baselines and score is not None:
        methods.update({b: baseline(b, method) for b in BASELINES})
    depth = max(TOP_K, int(rerank.topk)) if rerank else TOP_K
    per_method: dict[str, list[Any]] = {name: [] for name in methods}
    after: list[Any] = []
    seconds, widths = 0.0, []
    for unit in benchmark.units:
        ranked = search_methods(
            methods,
            unit.queries,
            gallery=unit.gallery,
            k=depth,
            exclude_reference=unit.exclude_reference,
            options=options,
        )
        for name, result in ranked.items():
            per_method[name].append(unit.convert(result))
        if rerank is not None:
            reranked, width, spent = _rerank(unit, ranked[_METHOD], rerank)
            after.append(unit.convert(reranked))
            widths.append(width)
            seconds += spent
    metrics: dict[str, Any] = score(per_method[_METHOD]) if score else {}
    if rerank is not None:
        metrics = {
            "before": metrics,
            "after": score(after) if score and after else {},
            "rerank": rerank.name,
            "rerank_topk": min(widths) if widths else 0,
            "rerank_seconds": seconds,
        }
    scored_baselines = {b: score(per_method[b]) for b in BASELINES if b in per_method} if score else {}
    files: list[str] = []
    if score is None and out is not None:
        files = benchmark.server_files(after if rerank is not None else per_method[_METHOD], Path(out))
    return CirEvaluation(
        benchmark=benchmark.name,
        split=benchmark.split,
        metrics=metrics,
        baselines=scored_baselines,
        files=files,
        gallery=benchmark.gallery,
        rankings=per_method,
    )
