r"""``capret convert-xvlm``: prepare a released X-VLM / X²-VLM checkpoint for ``capret-train`` and ``load_model``.

    capret convert-xvlm --preset x2vlm-base --out models/x2vlm_base \
        [--tokenizer bert-base-uncased] [--checkpoint x2vlm_base_4m.th]

Writes OUT (the folder ``model.pretrained`` points at: a BLIP config describing the text/fusion stack, the
tokenizer and the image processor; no weights) and OUT/model.yaml, the ``model:`` section to paste into a
dual-stream config. With ``--checkpoint`` it also builds the model and converts the checkpoint now (tensors only:
safetensors or ``torch.load(weights_only=True)``), so a wrong preset or an unsupported checkpoint fails here with
every unmatched key listed, not an hour into a job. Prints a JSON report (dropped keys: heads retrieval does not use).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from capret.cli.common import add_command, print_json

__all__ = ["HELP", "add_parser", "run"]

#: the line of ``capret --help``'s command list (``--help`` of the command prints the module docstring)
HELP = "write the config folder for a released X-VLM / X²-VLM checkpoint and check the conversion"


def add_parser(subparsers: Any) -> None:
    p = add_command(subparsers, __name__, help=HELP, run=run, summary=False)
    p.add_argument(
        "--preset",
        required=True,
        help="released model: xvlm-base (Swin-B, 224 px), xvlm-base-384 (its 384 px fine-tunes), x2vlm-base, x2vlm-large (BEiT-v2)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write (model.pretrained)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="BERT tokenizer folder or hub id (default: the preset's, e.g. bert-base-uncased)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="X-VLM checkpoint (.th/.pth/.safetensors) to convert now",
    )


def run(args: argparse.Namespace) -> int:
    import yaml

    from capret.io import atomic_write_text
    from capret.models.xvlm_convert import write_xvlm_assets

    entries = write_xvlm_assets(args.out, args.preset, tokenizer=args.tokenizer)
    report: dict[str, Any] = {"out": str(args.out), "model": entries}
    if args.checkpoint is not None:
        from capret.models.dual_stream import DualStreamModelConfig, create_dual_stream_model
        from capret.models.xvlm_convert import convert_xvlm_state_dict, read_checkpoint_tensors

        model = create_dual_stream_model(DualStreamModelConfig(**entries))
        state = read_checkpoint_tensors(args.checkpoint)
        converted, dropped = convert_xvlm_state_dict(state, model)
        model.load_state_dict(converted, strict=True)
        entries["xvlm_checkpoint"] = str(args.checkpoint)
        report.update(checkpoint=str(args.checkpoint), tensors=len(state), dropped_keys=dropped)
    atomic_write_text(args.out / "model.yaml", yaml.safe_dump({"model": entries}, sort_keys=False))
    report["model_yaml"] = str(args.out / "model.yaml")
    print_json(report)
    return 0
