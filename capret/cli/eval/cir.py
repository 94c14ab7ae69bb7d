"""``capret-eval cir --dataset fashioniq|cirr|circo --method METHOD --root DIR --split val|test``.

Evaluates one composed-retrieval method (``--method``, default ``combiner``; the names come from
:mod:`capret.inference.cir.registry`) with each benchmark's official protocol. This module only maps the flags
onto the library: the protocol (units, metrics, server files, reranking) is
:func:`capret.inference.cir.benchmarks.evaluate_cir`, the same function the Combiner's validation calls.
``combiner`` reads a trained ``--checkpoint`` (a ``combiner`` model folder, checkpoint or run folder; stage 1:
fine-tuned CLIP + element-wise sum; stage 2: Combiner on the CLIP the folder records); every other method runs
on ``--clip NAME`` (``--clip-backend hf|open_clip``, ``--clip-pretrained TAG``, or an exported ``clip`` model
folder), with ``--mapper FOLDER`` (a ``phi``/``pic2word``/``lincir`` model folder) for the textual-inversion
methods and ``--captioner ...`` for ``cirevl``.

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

from pathlib import Path
from typing import Any

from capret.cli.eval.cir_config import CirEvalConfig
from capret.config import ConfigError
from capret.errors import DataError
from capret.inference.cir.benchmarks import SPLITS, RerankSpec, evaluate_cir, open_benchmark
from capret.inference.cir.methods import CaptionerSpec, CirMethod, ClipSpec, MethodInputs, create_cir_method
from capret.inference.cir.search import FeatureOptions
from capret.io import atomic_write_json, default_device


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
        oti_settings={
            key: value
            for key, value in (("steps", args.oti_steps), ("batch_size", args.oti_batch_size))
            if value is not None
        },
    )


def _validate(args: CirEvalConfig) -> None:
    split = args.split or "val"
    if split not in SPLITS[args.dataset]:
        raise ConfigError(
            f"--split {split!r} is not valid for {args.dataset}; choose {', '.join(SPLITS[args.dataset])}"
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
    """Metrics (val) or server files (test) of one CIR method, with the shortcut baselines beside them: the flags
    mapped onto :func:`capret.inference.cir.benchmarks.evaluate_cir`, the result written to ``<out>/metrics.json``."""
    _validate(args)
    device = default_device(args.device)
    out = _out_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    method: CirMethod = create_cir_method(args.method, _method_inputs(args, device=str(device), out=out))
    benchmark = open_benchmark(
        args.dataset,
        root=args.root,
        split=args.split,
        categories=[args.category] if args.category else None,
        gallery_ids=args.gallery_ids if args.dataset == "circo" else None,
    )
    evaluation = evaluate_cir(
        method,
        benchmark,
        options=FeatureOptions(cache_dir=out / "feature_cache", batch_size=args.batch_size),
        rerank=RerankSpec(args.rerank, int(args.rerank_topk)) if args.rerank else None,
        out=out,
    )
    described = method.describe()
    result: dict[str, Any] = {
        "dataset": args.dataset,
        "split": args.split,
        "method": args.method,
        **{k: v for k, v in described.items() if k != "method"},
        "metrics": evaluation.metrics,
        "baselines": evaluation.baselines,
        "gallery": evaluation.gallery,
        "files": evaluation.files,
    }
    if method.report():
        result["report"] = method.report()
    atomic_write_json(out / "metrics.json", result)
    return result
