"""Flags and typed config of ``capret-eval cir`` (light to import: ``--help`` loads no model code; the runner is
:mod:`.cir`, the methods live in :mod:`capret.inference.cir.methods`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from capret.cli.common import positive_int
from capret.cli.eval.common import add_device, add_out, add_rerank, config_from

CLIP_BACKENDS = ("hf", "open_clip")
PREPROCESS = ("targetpad", "squarepad", "none")


@dataclass
class CirEvalConfig:
    """What ``capret-eval cir`` evaluates (the flags below, typed)."""

    dataset: str  # fashioniq | cirr | circo
    checkpoint: Path | None  # combiner checkpoint or run folder
    root: Path  # dataset root (official layout)
    split: str  # val | test (cirr also test1)
    category: str | None  # FashionIQ category (default: all three)
    gallery_ids: Path | None  # CIRCO gallery ids file
    rerank: str | None  # reranker name
    rerank_topk: int  # how many results the reranker reorders
    batch_size: int  # feature-extraction batch size
    device: str | None  # torch device
    out: Path | None  # output folder (default beside the checkpoint)
    method: str = "combiner"  # CIR method (capret.inference.cir.registry)
    clip: str | None = None  # CLIP of methods without a combiner checkpoint
    clip_backend: str = "hf"  # hf | open_clip
    clip_pretrained: str | None = None  # open_clip pretrained tag or weights file
    preprocess: str = "targetpad"  # image preprocessing before the model's own
    mapper: Path | None = None  # phi / Pic2Word / LinCIR checkpoint
    captioner: str = "template"  # CIReVL caption backend
    vlm: str = ""  # CIReVL captioner model (hub id / folder / served name)
    llm: str = ""  # CIReVL rewriting LLM (default: the VLM)
    base_url: list[str] = field(default_factory=list)  # OpenAI-compatible servers
    api_key_env: str | None = None  # env var holding the API key
    concurrency: int = 8  # server requests in flight
    captioner_device: str = "cpu"  # transformers backend device
    captioner_dtype: str = "auto"  # transformers backend dtype
    caption_store: Path | None = None  # CIReVL caption store
    caption_batch_size: int = 16  # CIReVL requests per backend call
    prompt_file: Path | None = None  # CIReVL per-dataset rewrite prompts (the paper's, supplied by the user)
    on_missing: str = "error"  # CIReVL query without a description: error | text-only
    caption_max_tokens: int = 77  # CIReVL description token limit
    rewrite_max_tokens: int = 96  # CIReVL rewrite token limit (paper: 700)
    oti_tokens: Path | None = None  # SEARLE-OTI token store
    oti_phrases: Path | None = None  # SEARLE-OTI regulariser phrase file
    oti_steps: int | None = None  # OTI steps per image (None: OTIConfig's)
    oti_batch_size: int | None = None  # images optimised together (None: OTIConfig's)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from capret.cli.oti import add_oti_flags
    from capret.data import list_datasets
    from capret.inference.cir.registry import list_cir_methods
    from captioning.backends import list_backends

    p.add_argument("--dataset", required=True, choices=list_datasets(kind="cir"), help="CIR benchmark")
    p.add_argument(
        "--method",
        default="combiner",
        choices=list_cir_methods(),
        help="CIR method (default combiner); image-only/text-only/sum are the shortcut baselines, which are "
        "also reported beside every method",
    )
    p.add_argument("--checkpoint", type=Path, help="combiner checkpoint folder (or run folder)")
    p.add_argument("--root", type=Path, required=True, help="dataset root folder (official layout)")
    p.add_argument("--split", default="val", help="val | test (cirr: also test1); default val")
    p.add_argument(
        "--category", default=None, help="FashionIQ category (dress|shirt|toptee; default all three)"
    )
    p.add_argument(
        "--gallery-ids",
        type=Path,
        help="CIRCO gallery: COCO image-info JSON, JSON list of ids, or text file of ids (default: the image-info "
        "file under --root, else every <id>.jpg in COCO2017_unlabeled/unlabeled2017)",
    )
    clip = p.add_argument_group("CLIP of methods without a combiner checkpoint")
    clip.add_argument(
        "--clip",
        help="hf: hub id or local folder (openai/clip-vit-large-patch14); open_clip: architecture (ViT-L-14, "
        "ViT-bigG-14, RN50x4) or local-dir:/path; default: the CLIP a --mapper checkpoint records",
    )
    clip.add_argument("--clip-backend", default="hf", choices=CLIP_BACKENDS, help="model family (default hf)")
    clip.add_argument(
        "--clip-pretrained", help="open_clip pretrained tag (openai, laion2b_s39b_b160k) or weights file"
    )
    clip.add_argument(
        "--preprocess", default="targetpad", choices=PREPROCESS, help="padding before the model's transform"
    )
    clip.add_argument(
        "--mapper", type=Path, help="phi / Pic2Word / LinCIR checkpoint (searle, pic2word, lincir)"
    )
    cap = p.add_argument_group("CIReVL captioner (--method cirevl)")
    cap.add_argument("--captioner", default="template", choices=list_backends(), help="caption backend")
    cap.add_argument(
        "--vlm", default="", help="captioning VLM: hub id / folder (transformers), served name (openai)"
    )
    cap.add_argument("--llm", default="", help="rewriting LLM (default: the VLM)")
    cap.add_argument(
        "--base-url",
        action="append",
        default=[],
        help="OpenAI-compatible server base URL (repeat for several)",
    )
    cap.add_argument("--api-key-env", help="environment variable holding the API key")
    cap.add_argument(
        "--concurrency", type=positive_int, default=8, help="server requests in flight (default 8)"
    )
    cap.add_argument("--captioner-device", default="cpu", help="transformers backend device (default cpu)")
    cap.add_argument(
        "--captioner-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="dtype"
    )
    cap.add_argument(
        "--caption-store",
        type=Path,
        help="JSONL store of descriptions and rewrites (default: <out>/cirevl_<captioner>.jsonl); a rerun "
        "reads it and makes no model call",
    )
    cap.add_argument("--caption-batch-size", type=positive_int, default=16, help="requests per backend call")
    cap.add_argument(
        "--prompt-file",
        type=Path,
        help="rewrite prompts: a text file (one prompt) or a JSON object {dataset: prompt} (the paper's per-dataset "
        "prompts); sent with 'Image Content:' / 'Instruction:' lines as CIReVL does (default: our own prompt)",
    )
    cap.add_argument(
        "--on-missing",
        default="error",
        choices=["error", "text-only"],
        help="a reference without a description (empty or failed): error (default; rerun retries) or text-only "
        "(score it with its relative caption, counted as a fallback)",
    )
    cap.add_argument(
        "--caption-max-tokens", type=int, default=77, help="description token limit (default 77)"
    )
    cap.add_argument(
        "--rewrite-max-tokens", type=int, default=96, help="rewrite token limit (default 96; CIReVL: 700)"
    )
    oti = p.add_argument_group("SEARLE-OTI (--method searle-oti)")
    oti.add_argument(
        "--oti-tokens",
        type=Path,
        help="token store of the reference images (default: <out>/oti_tokens.safetensors); resumed, so a rerun "
        "optimises nothing",
    )
    oti.add_argument(
        "--oti-phrases",
        type=Path,
        help="phrase file of the regulariser (capret oti writes one); default: off",
    )
    add_oti_flags(oti, prefix="oti_", names=("steps", "batch_size"))
    add_rerank(p)
    add_device(p)
    add_out(p, "metrics.json, rankings and server files (default: beside the checkpoint or mapper)")


def config_from_args(namespace: argparse.Namespace) -> CirEvalConfig:
    return config_from(namespace, CirEvalConfig)
