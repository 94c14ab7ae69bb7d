"""``capret-eval cir --dataset fashioniq|cirr|circo --checkpoint CKPT --root DIR --split val|test``.

Evaluates a ``combiner`` checkpoint (stage 1: fine-tuned CLIP + element-wise sum; stage 2: Combiner on the
CLIP its sidecar names) with each benchmark's official protocol. On ``val`` it returns the metrics; on
``test`` (no public targets) it writes the files the evaluation servers take: CIRR ``recall`` and
``recall_subset`` submissions, the CIRCO submission, and for FashionIQ the top-50 rankings per category.
Files go to ``--out`` (default: ``<checkpoint>_eval_<dataset>_<split>`` beside the checkpoint folder); image features are cached under
``<out>/feature_cache`` so evaluating several Combiners on one CLIP encodes the gallery once. The cut-offs are
each protocol's own (FashionIQ R@10/50, CIRR R@1/5/10/50 and Recall_subset@1/2/3, CIRCO mAP@5/10/25/50), so
``--ks`` does not apply here.

``--rerank NAME [--rerank-topk K]`` reorders the top K of every global ranking (composed query features against
target-image features; ``geometric`` verifies the reference image against each candidate image) and the
``metrics`` entry becomes ``{"before": {...}, "after": {...}, "rerank": NAME, "rerank_topk": K, "rerank_seconds":
s}``, as in the DeepFashion2 modes; without ``--rerank`` it holds the metrics themselves. The global search then
keeps ``max(50, K)`` results. For CIRR the reranked list is the reference-free global ranking, and the query's
remaining ``img_set`` members are appended afterwards in score order (Recall_subset reads their relative order).
On test splits the server files are written from the reranked rankings.

The CIRCO gallery is ``--gallery-ids`` (a COCO image-info JSON, a JSON id list or a text file) when that flag
exists, else the COCO image-info file under the root, else every ``*.jpg`` in the unlabeled image folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from capret.cli.eval.cir_config import CirEvalConfig
from capret.cli.eval.common import require
from capret.config import ConfigError, to_dict
from capret.errors import DataError
from capret.inference.cir import (
    TOP_K,
    CIRRanking,
    FeatureOptions,
    circo_ids,
    circo_search,
    cirr_search,
    cirr_with_members,
    fashioniq_search,
    image_refs,
    rerank_cir,
)
from capret.inference.loading import load_cir_model
from capret.io import atomic_write_json, default_device, resolve_model_folder
from capret.models.clip import ClipBundle

_SPLITS = {"fashioniq": ("val", "test"), "cirr": ("val", "test", "test1"), "circo": ("val", "test")}


def _circo_gallery(args: CirEvalConfig, root: Path) -> list[int] | str | Path | None:
    from capret.data.circo import IMAGE_FOLDER, IMAGE_INFO

    given = args.gallery_ids
    if given is not None:
        return Path(given)
    if (root / IMAGE_INFO).is_file():
        return None  # the dataset reads the official image-info file itself
    folder = root / IMAGE_FOLDER
    ids = sorted(int(p.stem) for p in folder.glob("*.jpg") if p.stem.isdigit())
    if not ids:
        raise FileNotFoundError(
            f"CIRCO gallery: no --gallery-ids, no {root / IMAGE_INFO} and no <id>.jpg images in {folder}"
        )
    return ids


@dataclass
class _Job:
    """What every benchmark handler needs: parsed flags, the model, feature options, output folder."""

    args: CirEvalConfig
    clip: ClipBundle
    fuser: nn.Module
    options: FeatureOptions
    out: Path

    @property
    def depth(self) -> int:
        """How many results the global search keeps: the protocols' 50, or more for the reranker's head."""
        return max(TOP_K, int(self.args.rerank_topk)) if self.args.rerank else TOP_K


@dataclass
class _Outcome:
    """Rankings before and (with ``--rerank``) after reranking, per benchmark-specific unit."""

    before: Any
    after: Any = None
    rerank_topk: int = 0
    rerank_seconds: float = 0.0

    @property
    def final(self) -> Any:
        """What server files are written from: the reranked rankings when there are any."""
        return self.before if self.after is None else self.after


def _rerank(
    job: _Job, result: CIRRanking, *, dataset: Any, references: list[str]
) -> tuple[CIRRanking, int, float]:
    """Apply ``--rerank`` to one global ranking; geometric verification gets the reference and gallery paths."""
    query_images = gallery_images = None
    if job.args.rerank == "geometric":
        query_images = image_refs(dataset, references)
        gallery_images = image_refs(dataset, result.gallery.names)
    return rerank_cir(
        result,
        reranker=require(job.args.rerank, "--rerank"),
        topk=int(job.args.rerank_topk),
        query_images=query_images,
        gallery_images=gallery_images,
    )


def _fashioniq(job: _Job) -> tuple[_Outcome, Any, list[str]]:
    from capret.data.fashioniq import CATEGORIES, FashionIQ
    from capret.evaluation.cir import fashioniq_recall

    args = job.args
    categories = [args.category] if args.category else list(CATEGORIES)
    datasets = [FashionIQ(args.root, c, args.split) for c in categories]
    searched = {
        ds.category: fashioniq_search(job.clip, job.fuser, dataset=ds, k=job.depth, options=job.options)
        for ds in datasets
    }
    outcome = _Outcome(before={c: r.names for c, r in searched.items()})
    if args.rerank:
        after, widths = {}, []
        for ds in datasets:
            refs = [t.reference for t in ds.triplets]
            reranked, k_r, seconds = _rerank(job, searched[ds.category], dataset=ds, references=refs)
            after[ds.category] = reranked.names
            widths.append(k_r)
            outcome.rerank_seconds += seconds
        outcome.after, outcome.rerank_topk = after, min(widths)

    def metrics(rankings: dict[str, list[list[str]]]) -> dict[str, float]:
        return fashioniq_recall(rankings, {ds.category: ds.annotations for ds in datasets})

    if args.split == "test":  # no public targets and no server: write the rankings themselves
        files = [
            str(
                atomic_write_json(
                    job.out / f"fashioniq_{c}_test_rankings.json",
                    {str(i): r[:TOP_K] for i, r in enumerate(ranks)},
                )
            )
            for c, ranks in outcome.final.items()
        ]
        return outcome, None, files
    return outcome, metrics, []


def _cirr(job: _Job) -> tuple[_Outcome, Any, list[str]]:
    from capret.data.cirr import CIRR
    from capret.evaluation.cir import cirr_metrics, write_cirr_submission

    ds = CIRR(job.args.root, job.args.split)
    searched = cirr_search(job.clip, job.fuser, dataset=ds, k=job.depth, options=job.options)
    # reranking reorders the reference-free global ranking; the remaining img_set members are appended after
    outcome = _Outcome(before=cirr_with_members(searched, dataset=ds))
    if job.args.rerank:
        refs = [t.reference for t in ds.triplets]
        reranked, outcome.rerank_topk, outcome.rerank_seconds = _rerank(
            job, searched, dataset=ds, references=refs
        )
        outcome.after = cirr_with_members(reranked, dataset=ds)
    if ds.split == "test1":
        files = [
            str(
                write_cirr_submission(
                    job.out / f"cirr_{kind}_test1.json", outcome.final, ds.annotations, kind=kind
                )
            )
            for kind in ("recall", "recall_subset")
        ]
        return outcome, None, files

    def metrics(rankings: dict[int, list[str]]) -> dict[str, float]:
        out = cirr_metrics(rankings, ds.annotations)
        out["r5_rs1_mean"] = (out["recall@5"] + out["recall_subset@1"]) / 2
        return out

    return outcome, metrics, []


def _circo(job: _Job) -> tuple[_Outcome, Any, list[str]]:
    from capret.data.circo import CIRCO
    from capret.evaluation.cir import circo_metrics, write_circo_submission

    root = Path(job.args.root)
    ds = CIRCO(root, job.args.split, gallery_ids=_circo_gallery(job.args, root))
    searched = circo_search(job.clip, job.fuser, dataset=ds, k=job.depth, options=job.options)
    outcome = _Outcome(before=circo_ids(searched, dataset=ds))
    if job.args.rerank:
        refs = [str(q.reference) for q in ds.queries]
        reranked, outcome.rerank_topk, outcome.rerank_seconds = _rerank(
            job, searched, dataset=ds, references=refs
        )
        outcome.after = circo_ids(reranked, dataset=ds)
    if job.args.split == "test":
        path = write_circo_submission(job.out / "circo_test.json", outcome.final, annotations=ds.annotations)
        return outcome, None, [str(path)]
    return outcome, lambda rankings: circo_metrics(rankings, ds.annotations), []


def _report(job: _Job, outcome: _Outcome, metrics: Any) -> dict[str, Any]:
    """The ``metrics`` entry: plain metrics, or ``{"before", "after", "rerank", ...}`` with ``--rerank``.

    Same layout as the DeepFashion2 modes (:mod:`capret.evaluation.retrieval_eval`); on test splits (no
    targets) the metric dicts are empty and only the reranker and its timing are reported.
    """
    score = metrics if metrics is not None else (lambda _: {})
    if not job.args.rerank:
        return dict(score(outcome.before))
    return {
        "before": score(outcome.before),
        "after": score(outcome.after),
        "rerank": job.args.rerank,
        "rerank_topk": outcome.rerank_topk,
        "rerank_seconds": outcome.rerank_seconds,
    }


def run(args: CirEvalConfig) -> dict[str, Any]:
    """Metrics (val) or server files (test) of a combiner checkpoint on a CIR benchmark."""
    split = args.split or "val"
    if split not in _SPLITS[args.dataset]:
        raise ConfigError(
            f"--split {split!r} is not valid for {args.dataset}; choose {', '.join(_SPLITS[args.dataset])}"
        )
    args.split = split
    if args.category is not None and args.dataset != "fashioniq":
        raise ConfigError(f"--category applies to fashioniq only (got --dataset {args.dataset})")
    if args.rerank is not None and int(args.rerank_topk) < 1:
        raise ConfigError(f"--rerank-topk must be >= 1, got {args.rerank_topk}")
    if not Path(args.root).is_dir():  # before the model loads: a mistyped root should fail in a second
        raise DataError(f"--root: the {args.dataset} dataset folder does not exist", path=args.root)
    device = default_device(args.device)
    checkpoint = resolve_model_folder(require(args.checkpoint, "--checkpoint", "a combiner checkpoint"))
    clip, fuser, config = load_cir_model(checkpoint, device=device)
    default_out = (
        checkpoint.parent / f"{checkpoint.name}_eval_{args.dataset}_{split}"
    )  # next to the checkpoint
    out = Path(args.out) if args.out is not None else default_out
    out.mkdir(parents=True, exist_ok=True)
    options = FeatureOptions(cache_dir=out / "feature_cache", batch_size=args.batch_size)
    handler = {"fashioniq": _fashioniq, "cirr": _cirr, "circo": _circo}[args.dataset]
    job = _Job(args=args, clip=clip, fuser=fuser, options=options, out=out)
    outcome, metric_fn, files = handler(job)
    metrics = _report(job, outcome, metric_fn)
    result = {
        "dataset": args.dataset,
        "split": split,
        "checkpoint": str(checkpoint),
        "stage": config.stage,
        "clip": to_dict(config.model.clip),
        "metrics": metrics,
        "files": files,
    }
    atomic_write_json(out / "metrics.json", result)
    return result
