r"""``capret oti``: SEARLE's optimisation-based textual inversion of every image of a folder or shard set.

    capret oti --clip-backend open_clip --clip ViT-L-14 --clip-pretrained openai --images DIR \
        --out tokens.safetensors [--phrases phrases.json | --concepts concepts.txt --phrase-backend openai \
        --phrase-base-url URL --phrase-model MODEL] [--steps 350 --batch-size 32 ...]

Tokens are stored per image key in a safetensors file and the run resumes: images already in ``--out`` are
skipped. The phrase regulariser reads ``--phrases`` (a phrase file), or generates phrases for ``--concepts``
with a captioning LLM backend into ``--phrases-out`` (cached: a rerun makes no model call); with neither, OTI
runs with the cosine loss alone. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Collection
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from capret.cli.common import (
    add_command,
    finite_float,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from capret.console import add_progress_flag, progress_wanted

__all__ = ["HELP", "add_oti_flags", "add_parser", "run"]

#: the line of ``capret --help``'s command list (``--help`` of the command prints the module docstring)
HELP = "SEARLE OTI: optimise one pseudo-word token per image (resumable safetensors token store)"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from capret.inference.cir.concepts import generate_continuations

    parser = add_command(subparsers, __name__, help=HELP, run=run)
    parser.add_argument(
        "--clip", required=True, help="hf: hub id or folder; open_clip: architecture or local-dir:DIR"
    )
    parser.add_argument("--clip-backend", default="hf", choices=["hf", "open_clip"], help="CLIP library")
    parser.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag or weights file")
    parser.add_argument("--preprocess", default="targetpad", choices=["targetpad", "squarepad", "none"])
    parser.add_argument("--images", type=Path, required=True, help="image folder (recursive) or .tar shards")
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read images whose symbolic links point outside --images (refused by default)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N images (sorted keys)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="token store (.safetensors), resumed if present"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:K (default: cuda if available)")
    parser.add_argument(
        "--phrases", type=Path, default=None, help="existing phrase file (concept -> phrases)"
    )
    parser.add_argument("--concepts", type=Path, default=None, help="concept vocabulary (one per line)")
    parser.add_argument("--phrase-backend", default=None, choices=["openai", "transformers"])
    parser.add_argument(
        "--phrase-base-url", default=None, help="openai: server URL (e.g. http://127.0.0.1:8000/v1)"
    )
    parser.add_argument("--phrase-model", default=None, help="model that writes the phrases")
    parser.add_argument(
        "--phrases-out", type=Path, default=None, help="phrase cache (default: OUT.phrases.json)"
    )
    parser.add_argument("--per-concept", type=positive_int, default=8, help="phrases requested per concept")
    parser.add_argument(
        "--phrase-style",
        choices=["chat", "searle"],
        default="chat",
        help="chat: ask a chat LLM for --per-concept phrases (ours); searle: the paper's continuations of 'a photo "
        "of {concept} that' sampled from a causal LM (--phrase-backend transformers; GPT-Neo 2.7B in the paper)",
    )
    # SEARLE's generation settings: each flag shows and uses generate_continuations' own default (the paper's)
    searle = inspect.signature(generate_continuations).parameters
    for flag, name, parse, what in (
        ("--phrase-samples", "samples", positive_int, "sequences per concept"),
        ("--phrase-temperature", "temperature", float, "sampling temperature"),
        ("--phrase-max-length", "max_length", positive_int, "tokens in all, prompt included"),
    ):
        parser.add_argument(
            flag, type=parse, default=searle[name].default, help=f"searle style: {what} (%(default)s)"
        )
    add_progress_flag(parser)
    add_oti_flags(parser)
    return parser


def add_oti_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    prefix: str = "",
    names: Collection[str] | None = None,
) -> None:
    """A flag ``--<prefix><field>`` (dest ``<prefix><field>``) per :class:`OTIConfig` field, or per field in
    ``names``, with the field's default, help and range, so no front end restates them (``capret oti`` takes
    all of them, ``capret-eval --method searle-oti`` a few under ``oti_``)."""
    from capret.inference.cir.oti import OTIConfig

    for f in fields(OTIConfig):
        if names is not None and f.name not in names:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: %(default)s)"
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default, help=help_text
            )
        else:
            by_type: dict[str, Callable[[str], Any]] = {"int": int, "float": finite_float, "str": str}
            kind = _OTI_RANGES.get(f.name) or by_type.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)


#: the range of each numeric OTI setting (argparse refuses others naming the option, e.g. ``--steps 0``)
_OTI_RANGES: dict[str, Any] = {
    "steps": positive_int,
    "lr": positive_float,
    "weight_decay": non_negative_float,
    "ema_decay": fraction,
    "lambda_cos": non_negative_float,
    "lambda_gpt": non_negative_float,
    "init_std": positive_float,
    "top_k": positive_int,
    "batch_size": positive_int,
    "save_every": positive_int,
    "seed": non_negative_int,
}


def _phrases(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from capret.errors import CapretError
    from capret.inference.cir.concepts import PhraseBank, generate_phrases, load_concepts
    from capret.io import default_device

    if args.phrases is not None:
        return PhraseBank.load(args.phrases), {"phrases": str(args.phrases)}
    if args.concepts is None:
        return None, {"phrases": None}
    if args.phrase_backend is None or not args.phrase_model:
        raise CapretError(
            "--concepts needs --phrase-backend and --phrase-model to write phrases (or pass --phrases)"
        )
    cache = args.phrases_out or args.out.with_suffix(".phrases.json")
    if args.phrase_style == "searle":
        if args.phrase_backend != "transformers":
            raise CapretError(
                "--phrase-style searle samples a local causal LM: use --phrase-backend transformers"
            )
        from capret.inference.cir.concepts import generate_continuations

        bank, stats = generate_continuations(
            args.phrase_model,
            load_concepts(args.concepts),
            cache=cache,
            samples=args.phrase_samples,
            temperature=args.phrase_temperature,
            max_length=args.phrase_max_length,
            device=str(default_device(args.device)),
        )
        return bank, {"phrases": str(cache), "phrase_generation": stats}
    from captioning.backends import create_backend

    if args.phrase_backend == "openai":
        if not args.phrase_base_url:
            raise CapretError("--phrase-backend openai needs --phrase-base-url")
        backend = create_backend(
            "openai", base_urls=[args.phrase_base_url], vlm=args.phrase_model, llm=args.phrase_model
        )
    else:  # a chat model of the transformers backend asks the text-only prompts itself
        backend = create_backend("transformers", vlm=args.phrase_model)
    with backend:
        bank, stats = generate_phrases(
            backend, load_concepts(args.concepts), cache=cache, per_concept=args.per_concept
        )
    return bank, {"phrases": str(cache), "phrase_generation": stats}


def run(args: argparse.Namespace) -> int:
    from capret.console import print_json
    from capret.data.image_sources import open_image_source
    from capret.inference.cir.oti import OTIConfig, run_oti
    from capret.io import default_device
    from capret.locks import exclusive_output
    from capret.models.clip import load_clip

    config = OTIConfig(**{f.name: getattr(args, f.name) for f in fields(OTIConfig)})
    source = open_image_source(args.images, limit=args.limit, follow_symlinks=args.follow_symlinks)
    # One writer per token store, taken before the phrase cache beside it is written.
    with exclusive_output(args.out, what="OTI token store"):
        bank, phrase_info = _phrases(args)
        clip = load_clip(
            args.clip,
            backend=args.clip_backend,
            pretrained=args.clip_pretrained,
            preprocess=args.preprocess,
            device=default_device(args.device),
        )
        report = run_oti(
            clip,
            source.keys,
            load_image=source.load,
            store=args.out,
            config=config,
            phrases=bank,
            progress=progress_wanted(args),
        )
    print_json({**asdict(report), **phrase_info, "images": len(source), "clip": clip.name})
    return 0
