"""``capret-eval cir --dataset fashioniq|cirr|circo --method METHOD --root DIR --split val|test``.

Evaluates one composed-retrieval method (``--method``, default ``combiner``; the names come from
:mod:`capret.inference.cir.registry`) with each benchmark's official protocol. ``combiner`` reads a trained
``--checkpoint`` (stage 1: fine-tuned CLIP + element-wise sum; stage 2: Combiner on the CLIP its sidecar
names); every other method runs on ``--clip NAME`` (``--clip-backend hf|open_clip``, ``--clip-pretrained TAG``),
with ``--mapper CKPT`` for the textual-inversion methods and ``--captioner ...`` for ``cirevl``.

On ``val`` it returns the metrics; on ``test`` (no public targets) it writes the files the evaluation servers
take: CIRR ``recall`` and ``recall_subset`` submissions, the CIRCO submission, and for FashionIQ the top-50
rankings per category. Files go to ``--out`` (default: ``<checkpoint or mapper>_eval_<dataset>_<split>``
beside it); image features are cached under ``<out>/feature_cache`` so evaluating several methods on one CLIP
encodes the gallery once. The cut-offs are each protocol's own (FashionIQ R@10/50, CIRR R@1/5/10/50 and
Recall_subset@1/2/3, CIRCO mAP@5/10/25/50).

**Shortcut baselines.** Every evaluation also ranks the gallery with the method's own CLIP by the reference
image alone (``image-only``), the relative caption alone (``text-only``) and their normalised ``sum``, and
reports their metrics under ``baselines`` beside the method's (many benchmark queries are solvable from one
modality, so a score means little without them). The output also records the ``gallery`` each protocol used
(CIRR: the whole split with each query's reference removed; FashionIQ: the category split, reference kept;
CIRCO: the whole gallery, reference kept).

``--rerank NAME [--rerank-topk K]`` reorders the top K of the method's global ranking (composed query features
against target-image features; ``geometric`` verifies the reference image against each candidate image) and the
``metrics`` entry becomes ``{"before": {...}, "after": {...}, "rerank": NAME, "rerank_topk": K, "rerank_seconds":
s}``; without ``--rerank`` it holds the metrics themselves. The global search then keeps ``max(50, K)``
results. For CIRR the reranked list is the reference-free global ranking, and the query's remaining ``img_set``
members are appended afterwards in score order (Recall_subset reads their relative order). On test splits the
server files are written from the reranked rankings. Baselines are not reranked.

The CIRCO gallery is ``--gallery-ids`` (a COCO image-info JSON, a JSON id list or a text file) when that flag
exists, else the COCO image-info file under the root, else every ``*.jpg`` in the unlabeled image folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capret.cli.eval.cir_config import CirEvalConfig
from capret.cli.eval.common import require
from capret.config import ConfigError
from capret.errors import DataError, MissingFileError
from capret.inference.cir.methods import (
    BASELINES,
    CaptionerSpec,
    CirMethod,
    CirQuerySet,
    ClipSpec,
    MethodInputs,
    baseline,
    circo_query_set,
    cirr_query_set,
    create_cir_method,
    fashioniq_query_set,
    search_methods,
)
from capret.inference.cir.search import (
    TOP_K,
    CIRRanking,
    FeatureOptions,
    circo_ids,
    cirr_with_members,
    image_refs,
    rerank_cir,
)
from capret.io import atomic_write_json, default_device

_SPLITS = {"fashioniq": ("val", "test"), "cirr": ("val", "test", "test1"), "circo": ("val", "test")}
_METHOD = "method"  # key of the evaluated method among the ranked ones (beside the baselines)


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
        raise MissingFileError(
            f"CIRCO gallery: no --gallery-ids, no {root / IMAGE_INFO} and no <id>.jpg images in {folder}"
        )
    return ids


@dataclass
class _Unit:
    """One ranked gallery: a FashionIQ category, or the CIRR / CIRCO split."""

    name: str
    dataset: Any
    queries: CirQuerySet
    gallery: list[str]
    exclude_reference: bool
    #: the global ranking -> what the metric and server writers of the benchmark take
    convert: Callable[[CIRRanking], Any]
    rankings: dict[str, CIRRanking] = field(default_factory=dict)
    reranked: CIRRanking | None = None


def _units(args: CirEvalConfig) -> list[_Unit]:
    if args.dataset == "fashioniq":
        from capret.data.fashioniq import CATEGORIES, FashionIQ

        categories = [args.category] if args.category else list(CATEGORIES)
        units = []
        for category in categories:
            ds = FashionIQ(args.root, category, args.split)
            units.append(
                _Unit(category, ds, fashioniq_query_set(ds), list(ds.gallery), False, lambda r: r.names)
            )
        return units
    if args.dataset == "cirr":
        from capret.data.cirr import CIRR

        cirr = CIRR(args.root, args.split)
        return [
            _Unit(
                "cirr", cirr, cirr_query_set(cirr), list(cirr.gallery), True,
                lambda r: cirr_with_members(r, dataset=cirr),
            )
        ]  # fmt: skip
    from capret.data.circo import CIRCO

    root = Path(args.root)
    circo = CIRCO(root, args.split, gallery_ids=_circo_gallery(args, root))
    return [
        _Unit(
            "circo", circo, circo_query_set(circo), [str(g) for g in circo.gallery], False,
            lambda r: circo_ids(r, dataset=circo),
        )
    ]  # fmt: skip


def _gallery_record(args: CirEvalConfig, units: list[_Unit]) -> dict[str, Any]:
    """Which gallery each protocol ranked, recorded in the output (the CIRR choice changes every number)."""
    sizes = {u.name: len(u.gallery) for u in units}
    if args.dataset == "cirr":
        return {"images": "whole split", "reference_removed": True, "size": sizes["cirr"]}
    if args.dataset == "circo":
        return {"images": "whole gallery", "reference_removed": False, "size": sizes["circo"]}
    return {"images": "category split", "reference_removed": False, "size": sizes}


def _metric_fn(args: CirEvalConfig, units: list[_Unit]) -> Callable[[list[Any]], dict[str, float]] | None:
    """Rankings per unit (as ``_Unit.convert`` gives them) -> the benchmark's metrics; None on test splits."""
    if args.split != "val":
        return None
    from capret.evaluation.cir import circo_metrics, cirr_metrics, fashioniq_recall

    if args.dataset == "fashioniq":
        annotations = {u.name: u.dataset.annotations for u in units}
        return lambda per_unit: fashioniq_recall(dict(zip(annotations, per_unit)), annotations)
    if args.dataset == "cirr":

        def cirr(per_unit: list[Any]) -> dict[str, float]:
            out = cirr_metrics(per_unit[0], units[0].dataset.annotations)
            out["r5_rs1_mean"] = (out["recall@5"] + out["recall_subset@1"]) / 2
            return out

        return cirr
    return lambda per_unit: circo_metrics(per_unit[0], units[0].dataset.annotations)


def _server_files(args: CirEvalConfig, units: list[_Unit], final: list[Any], out: Path) -> list[str]:
    """The evaluation servers' files of a test split, from the method's final rankings."""
    from capret.evaluation.cir import write_circo_submission, write_cirr_submission

    if args.dataset == "fashioniq":  # no public targets and no server: write the rankings themselves
        return [
            str(
                atomic_write_json(
                    out / f"fashioniq_{u.name}_test_rankings.json",
                    {str(i): r[:TOP_K] for i, r in enumerate(ranks)},
                )
            )
            for u, ranks in zip(units, final)
        ]
    if args.dataset == "cirr":
        if units[0].dataset.split != "test1":
            return []
        return [
            str(
                write_cirr_submission(
                    out / f"cirr_{kind}_test1.json", final[0], units[0].dataset.annotations, kind=kind
                )
            )
            for kind in ("recall", "recall_subset")
        ]
    path = write_circo_submission(out / "circo_test.json", final[0], annotations=units[0].dataset.annotations)
    return [str(path)]


def _rerank(args: CirEvalConfig, unit: _Unit) -> tuple[CIRRanking, int, float]:
    """Apply ``--rerank`` to the method's global ranking; geometric verification gets image paths."""
    result = unit.rankings[_METHOD]
    query_images = gallery_images = None
    if args.rerank == "geometric":
        query_images = image_refs(unit.dataset, unit.queries.references)
        gallery_images = image_refs(unit.dataset, result.gallery.names)
    return rerank_cir(
        result,
        reranker=require(args.rerank, "--rerank"),
        topk=int(args.rerank_topk),
        query_images=query_images,
        gallery_images=gallery_images,
    )


def _method_inputs(args: CirEvalConfig, *, device: str, out: Path) -> MethodInputs:
    clip = None
    if args.clip is not None:
        clip = ClipSpec(
            name=args.clip,
            backend=args.clip_backend,
            pretrained=args.clip_pretrained,
            preprocess=args.preprocess,
        )
    options: dict[str, Any] = {}
    if args.captioner == "transformers":
        options = {"vlm": args.vlm, "llm": args.llm or None, "device": args.captioner_device,
                   "dtype": args.captioner_dtype}  # fmt: skip
    elif args.captioner == "openai":
        options = {"base_urls": list(args.base_url), "vlm": args.vlm, "llm": args.llm or None,
                   "api_key_env": args.api_key_env, "concurrency": args.concurrency}  # fmt: skip
    return MethodInputs(
        device=device,
        work_dir=out,
        checkpoint=args.checkpoint,
        clip=clip,
        mapper=args.mapper,
        captioner=CaptionerSpec(backend=args.captioner, options=options),
        caption_store=args.caption_store,
        caption_batch_size=args.caption_batch_size,
        cirevl_settings={
            "prompt_file": args.prompt_file,
            "on_missing": args.on_missing,
            "max_caption_tokens": args.caption_max_tokens,
            "max_edit_tokens": args.rewrite_max_tokens,
        },
        oti_tokens=args.oti_tokens,
        oti_phrases=args.oti_phrases,
        oti_settings={"steps": args.oti_steps, "batch_size": args.oti_batch_size},
    )


def _validate(args: CirEvalConfig) -> None:
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
    if args.method == "combiner" and args.clip is not None:
        raise ConfigError("--method combiner reads its CLIP from --checkpoint; drop --clip")
    if args.method == "cirevl" and args.captioner in ("openai", "transformers") and not args.vlm:
        raise ConfigError(f"--captioner {args.captioner} needs --vlm (the captioning model)")
    if args.method == "cirevl" and args.captioner == "openai" and not args.base_url:
        raise ConfigError("--captioner openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    if args.method != "combiner" and args.checkpoint is not None:
        raise ConfigError(
            f"--checkpoint is a combiner checkpoint; --method {args.method} takes --clip/--mapper"
        )
    if not Path(args.root).is_dir():  # before the model loads: a mistyped root should fail in a second
        raise DataError(f"--root: the {args.dataset} dataset folder does not exist", path=args.root)


def _out_folder(args: CirEvalConfig) -> Path:
    if args.out is not None:
        return Path(args.out)
    anchor = args.checkpoint if args.method == "combiner" else args.mapper
    if anchor is None:
        raise ConfigError(f"--method {args.method} has no checkpoint to write beside: give --out FOLDER")
    from capret.io import resolve_model_folder

    folder = resolve_model_folder(Path(anchor)) if Path(anchor).is_dir() else Path(anchor)
    return folder.parent / f"{folder.name}_eval_{args.dataset}_{args.split}"


def run(args: CirEvalConfig) -> dict[str, Any]:
    """Metrics (val) or server files (test) of one CIR method, with the shortcut baselines beside them."""
    _validate(args)
    device = default_device(args.device)
    out = _out_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    method: CirMethod = create_cir_method(args.method, _method_inputs(args, device=str(device), out=out))
    units = _units(args)
    score = _metric_fn(args, units)
    methods = {_METHOD: method, **({b: baseline(b, method) for b in BASELINES} if score else {})}
    options = FeatureOptions(cache_dir=out / "feature_cache", batch_size=args.batch_size)
    depth = max(TOP_K, int(args.rerank_topk)) if args.rerank else TOP_K
    seconds, widths = 0.0, []
    for unit in units:
        unit.rankings = search_methods(
            methods,
            unit.queries,
            gallery=unit.gallery,
            k=depth,
            exclude_reference=unit.exclude_reference,
            options=options,
        )
        if args.rerank:
            unit.reranked, width, spent = _rerank(args, unit)
            widths.append(width)
            seconds += spent
    before = [u.convert(u.rankings[_METHOD]) for u in units]
    after = [u.convert(u.reranked) for u in units if u.reranked is not None] if args.rerank else None
    metrics: dict[str, Any] = score(before) if score else {}
    if args.rerank:
        metrics = {
            "before": metrics,
            "after": score(after) if score and after else {},
            "rerank": args.rerank,
            "rerank_topk": min(widths) if widths else 0,
            "rerank_seconds": seconds,
        }
    baselines = {b: score([u.convert(u.rankings[b]) for u in units]) for b in BASELINES} if score else {}
    files = _server_files(args, units, after or before, out) if score is None else []
    described = method.describe()
    result: dict[str, Any] = {
        "dataset": args.dataset,
        "split": args.split,
        "method": args.method,
        **{k: v for k, v in described.items() if k != "method"},
        "metrics": metrics,
        "baselines": baselines,
        "gallery": _gallery_record(args, units),
        "files": files,
    }
    if method.report():
        result["report"] = method.report()
    atomic_write_json(out / "metrics.json", result)
    return result
