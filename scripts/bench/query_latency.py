"""Query latency of the photo-to-list pipeline, per stage, and what captioning adds (one JSON object).

"Captions are likely to slow down the retrieval — quantify the delay": this runs ``RetrievalPipeline.search`` on
``--n`` different query photos (so every caption is a cache miss) for each captioner and prints p50/p95
milliseconds of every stage (detect, caption, embed, search, rerank) and end to end:

* ``image_only`` — the caption stage off (the dual-stream model's image-only path): the baseline;
* ``template`` — the model-free template dialogue (pixel colour statistics);
* ``transformers`` — a local VLM + LLM through ``transformers`` (``--vlm/--llm`` folders or hub ids; by default
  the tiny randomly initialised LLaVA + Llama of ``tests/helpers/tiny_vlm.py``, which measures the loop's own
  overhead, not a real model's generation time);
* ``openai`` — an OpenAI-compatible server: the loopback ``capret.testing.ChatServer`` answering after
  ``--server-delay`` seconds per request (a stand-in for a vLLM/Ollama round trip), or ``--base-url`` of a real one.

``caption_delay_ms`` is each captioner's p50 end-to-end time minus the image-only p50. The pipeline folder is
``--pipeline`` (default: the one ``capret quickstart`` leaves, ``capret_quickstart/pipeline``); queries are its
gallery photos unless ``--queries DIR`` is given.

    python scripts/bench/query_latency.py [--pipeline DIR] [--n 30] [--rounds 3] [--server-delay 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

# this folder holds a benchmark named captioning.py, which would shadow the captioning package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from capret.inference.query.captioner import Captioner  # noqa: E402
from capret.inference.query.pipeline import STAGES, RetrievalPipeline  # noqa: E402
from capret.retrieval.rerank import create_reranker  # noqa: E402
from captioning.backends import create_backend  # noqa: E402
from captioning.loop import LoopConfig  # noqa: E402


def _percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(float(np.percentile(values, 50)), 2),
        "p95": round(float(np.percentile(values, 95)), 2),
    }


def _queries(pipeline: RetrievalPipeline, folder: Path | None, n: int) -> list[Path]:
    if folder is not None:
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    else:
        paths = sorted({Path(item["image"]) for item in pipeline.gallery.items})
    if len(paths) < n + 1:
        raise SystemExit(f"need {n + 1} distinct query photos (n + 1 warm-up), found {len(paths)}")
    return paths[: n + 1]


def _measure(
    pipeline: RetrievalPipeline, queries: list[Path], *, use_captions: bool, k: int
) -> dict[str, Any]:
    pipeline.search(queries[-1], k=k, use_captions=use_captions)  # warm-up: first-call allocations, caches
    per_stage: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "total")}
    failed = 0
    for path in queries[:-1]:
        result = pipeline.search_detailed(path, k=k, use_captions=use_captions)
        failed += len(result.caption_errors)
        for stage in per_stage:
            per_stage[stage].append(result.timings[stage])
    return {
        "stages_ms": {stage: _percentiles(per_stage[stage]) for stage in STAGES},
        "end_to_end_ms": _percentiles(per_stage["total"]),
        "caption_failures": failed,
    }


def _tiny_models(directory: Path) -> tuple[str, str]:
    helpers = Path(__file__).resolve().parents[2] / "tests" / "helpers"
    sys.path.insert(0, str(helpers))
    from tiny_vlm import build_tiny_llama, build_tiny_llava

    return str(build_tiny_llava(directory / "llava")), str(build_tiny_llama(directory / "llama"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pipeline", type=Path, default=Path("capret_quickstart/pipeline"), help="pipeline folder"
    )
    p.add_argument(
        "--queries", type=Path, default=None, help="folder of query photos (default: gallery photos)"
    )
    p.add_argument("--n", type=int, default=30, help="query photos per captioner")
    p.add_argument("--k", type=int, default=20, help="length of the ranked list")
    p.add_argument("--rounds", type=int, default=3, help="question/answer rounds of the caption dialogue")
    p.add_argument("--rerank", default="aqe", help="reranker for every variant ('none' to skip)")
    p.add_argument("--rerank-topk", type=int, default=50, help="head results the reranker reorders")
    p.add_argument("--server-delay", type=float, default=0.05, help="loopback server seconds per request")
    p.add_argument("--base-url", default=None, help="a real OpenAI-compatible server instead of the loopback")
    p.add_argument("--server-model", default="tiny", help="model name for --base-url")
    p.add_argument("--vlm", default=None, help="transformers VLM (default: tiny random LLaVA)")
    p.add_argument("--llm", default=None, help="transformers LLM (default: tiny random Llama)")
    p.add_argument("--device", default="cpu", help="torch device of the model and the transformers captioner")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 = latency on a shared CPU)"
    )
    p.add_argument("--skip", nargs="*", default=[], help="variants to skip: template transformers openai")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    pipeline = RetrievalPipeline.load(args.pipeline, device=args.device)
    pipeline.use_captions = True
    if args.rerank != "none":
        pipeline.reranker = create_reranker(args.rerank)
        pipeline.rerank_topk = args.rerank_topk
    else:
        pipeline.reranker = None
    queries = _queries(pipeline, args.queries, args.n)
    loop = LoopConfig(rounds=args.rounds)
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "pipeline": str(args.pipeline),
        "gallery_items": len(pipeline.gallery),
        "queries": args.n,
        "k": args.k,
        "rounds": args.rounds,
        "reranker": None if args.rerank == "none" else {"name": args.rerank, "topk": args.rerank_topk},
        "variants": {},
    }
    variants = result["variants"]
    variants["image_only"] = _measure(pipeline, queries, use_captions=False, k=args.k)

    def with_backend(name: str, backend: Any, extra: dict[str, Any]) -> None:
        pipeline.captioner = Captioner(
            backend, loop=loop, cache=None
        )  # memory cache, empty: every query a miss
        try:
            variants[name] = {**extra, **_measure(pipeline, queries, use_captions=True, k=args.k)}
        finally:
            pipeline.captioner.close()

    if "template" not in args.skip:
        with_backend("template", create_backend("template"), {})
    if "transformers" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            vlm, llm = (args.vlm, args.llm) if args.vlm else _tiny_models(Path(tmp))
            backend = create_backend("transformers", vlm=vlm, llm=llm, device=args.device)
            tiny = args.vlm is None
            with_backend(
                "transformers",
                backend,
                {
                    "vlm": "tiny-random-llava" if tiny else vlm,
                    "llm": llm if not tiny else "tiny-random-llama",
                },
            )
    if "openai" not in args.skip:
        if args.base_url:
            backend = create_backend("openai", base_urls=[args.base_url], vlm=args.server_model)
            with_backend("openai", backend, {"server": args.base_url})
        else:
            from capret.testing import ChatServer

            with ChatServer(latency=args.server_delay) as server:
                backend = create_backend("openai", base_urls=[server.base_url], vlm="loopback")
                extra = {
                    "server": "loopback ChatServer",
                    "server_delay_ms_per_request": args.server_delay * 1000,
                }
                with_backend("openai", backend, extra)
                variants["openai"]["requests_per_query"] = round(server.requests / (args.n + 1), 2)
    base = variants["image_only"]["end_to_end_ms"]["p50"]
    result["caption_delay_ms"] = {
        name: round(v["end_to_end_ms"]["p50"] - base, 2)
        for name, v in variants.items()
        if name != "image_only"
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
