r"""``capret convert-checkpoint``: a paper's released checkpoint as a capret model folder.

    capret convert-checkpoint --from searle --checkpoint SEARLE_ViT-L14.pt --clip ViT-L-14 --out models/searle_l14
    capret convert-checkpoint --from clip4cir --checkpoint fiq_comb_RN50x4_fullft.pt \
        --clip-checkpoint fiq_clip_RN50x4_fullft.pt --clip RN50x4 --out models/clip4cir_fiq

Sources: searle (``{"Phi": ...}``), lincir (``{"Phi": ...}``), pic2word (``state_dict_img2text`` + its frozen CLIP),
clip4cir (``{"Combiner": ...}`` plus, with ``--clip-checkpoint``, ``{"CLIP": ...}``). Files are read with
``torch.load(weights_only=True)`` or safetensors: a pickle that carries code is refused, never run. Every
checkpoint entry is accounted for in the printed JSON report (mapped, or dropped with the reason); keys that
match nothing, or a backbone of another size, stop the conversion with all of them listed. The folder opens with
``capret-eval cir --method <searle|pic2word|lincir> --mapper OUT`` (``--method combiner --checkpoint OUT``) and
``capret.load(OUT)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from capret.cli.common import add_command, call_with_flags, print_json

__all__ = ["HELP", "SOURCES", "add_parser", "run"]

#: the line of ``capret --help``'s command list (``--help`` of the command prints the module docstring)
HELP = "convert a released SEARLE / Pic2Word / LinCIR / CLIP4Cir checkpoint into a capret model folder"

#: ``--from`` values (the registry :mod:`capret.models.convert`; kept here so ``--help`` imports no torch)
SOURCES = ("clip4cir", "lincir", "pic2word", "searle")
#: the ``capret-eval cir`` flag that takes a folder of this kind (the method comes from the converter registry)
_FOLDER_FLAG = {"combiner": "--checkpoint"}  # every other kind is a mapper (phi, pic2word, lincir)


def add_parser(subparsers: Any) -> None:
    p = add_command(subparsers, __name__, help=HELP, run=run, summary=False)
    p.add_argument(
        "--from", dest="source", required=True, choices=SOURCES, help="the project that released it"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="the released file (.pt/.pth/.safetensors; clip4cir: Combiner)",
    )
    p.add_argument(
        "--clip",
        required=True,
        help="backbone: open_clip architecture (ViT-L-14, ViT-B-32, RN50x4, local-dir:/path) or Hugging Face hub "
        "id / folder (openai/clip-vit-large-patch14)",
    )
    p.add_argument("--out", type=Path, required=True, help="model folder to write (replaced if it exists)")
    p.add_argument(
        "--clip-backend",
        choices=["hf", "open_clip"],
        default=None,
        help="model family of --clip (default: the project's own: open_clip for searle/pic2word/clip4cir, hf for "
        "lincir)",
    )
    p.add_argument(
        "--clip-pretrained",
        default=None,
        help="open_clip pretrained tag or weights file (default: openai for a bare architecture name)",
    )
    p.add_argument(
        "--clip-checkpoint",
        type=Path,
        default=None,
        help="clip4cir: the fine-tuned CLIP file ({'CLIP': ...})",
    )
    p.add_argument(
        "--preprocess",
        choices=["targetpad", "squarepad", "none"],
        default=None,
        help="override the paper's preprocessing (searle/clip4cir: targetpad; pic2word/lincir: none = CLIP's "
        "centre crop)",
    )
    p.add_argument(
        "--device", default="cpu", help="where the backbone is loaded for the checks (default cpu)"
    )


def run(args: argparse.Namespace) -> int:
    from capret.tasks.released import convert_released_checkpoint

    report = call_with_flags(convert_released_checkpoint, args, args.source)
    data = report.to_json()
    flag = _FOLDER_FLAG.get(report.kind, "--mapper")
    data["evaluate"] = (
        f"capret-eval cir --method {report.method} {flag} {args.out} --dataset DATASET --root ROOT"
    )
    print_json(data)
    return 0
