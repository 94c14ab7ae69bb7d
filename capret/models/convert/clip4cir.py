"""CLIP4Cir's released checkpoints (ABaldrati/CLIP4Cir): the Combiner and the fine-tuned CLIP, two files.

``src/utils.py``'s ``save_model`` writes ``{"epoch", <class name>: state_dict}``: ``"Combiner"`` for stage 2
(``src/combiner.py``) and ``"CLIP"`` for the stage-1 fine-tuned OpenAI CLIP (``clip.load(..., jit=False)``, so
OpenAI's names: ``visual.*``, ``transformer.resblocks.*``, ``token_embedding``, ``text_projection``, ...).
CLIP4Cir's Combiner keeps one ``nn.Linear`` per role; :class:`capret.models.combiner.Combiner` groups them in
Sequentials:

=================================  ==============================
CLIP4Cir                           capret
=================================  ==============================
``text_projection_layer.{w,b}``    ``text_projection.0.{w,b}``
``image_projection_layer.{w,b}``   ``image_projection.0.{w,b}``
``combiner_layer.{w,b}``           ``fusion.0.{w,b}``
``output_layer.{w,b}``             ``fusion.3.{w,b}``
``dynamic_scalar.{0,3}.{w,b}``     ``dynamic_scalar.{0,3}.{w,b}``
=================================  ==============================

``logit_scale`` is the constant 100 in both (not a tensor); dropout 0.5 everywhere. RN50x4: d = 640,
p = 2560, h = 5120.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from capret.errors import CheckpointError
from capret.models.combiner import Combiner
from capret.models.convert import common

__all__ = ["convert_clip4cir", "map_combiner"]

_RULES = (
    (re.compile(r"text_projection_layer\.(weight|bias)"), r"text_projection.0.\1"),
    (re.compile(r"image_projection_layer\.(weight|bias)"), r"image_projection.0.\1"),
    (re.compile(r"combiner_layer\.(weight|bias)"), r"fusion.0.\1"),
    (re.compile(r"output_layer\.(weight|bias)"), r"fusion.3.\1"),
    (re.compile(r"dynamic_scalar\.([03])\.(weight|bias)"), r"dynamic_scalar.\1.\2"),
)


#: where the Combiner's sizes are read (``d`` = CLIP features, ``p`` = projections, ``h`` = fusion MLP)
_COMBINER_SIZES = {
    "feature_dim": ("text_projection.0.weight", 1),
    "projection_dim": ("text_projection.0.weight", 0),
    "hidden_dim": ("fusion.0.weight", 0),
}


def map_combiner(
    state: dict[str, Tensor], *, path: Path
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, int]]:
    """CLIP4Cir's Combiner state dict in :class:`capret.models.combiner.Combiner`'s names, with its sizes."""
    return common.map_module_state(
        state, _RULES, path=path, sizes=_COMBINER_SIZES, build=Combiner, what="the Combiner"
    )


def convert_clip4cir(path: Path, *, extra: Path | None = None) -> common.MappedCheckpoint:
    """CLIP4Cir's Combiner file (``path``) and, if given, its fine-tuned CLIP file (``extra``)."""
    payload = common.read_tensor_file(path)
    if isinstance(payload, dict) and "CLIP" in payload and "Combiner" not in payload:
        raise CheckpointError(
            f"{path} holds CLIP4Cir's fine-tuned CLIP ('CLIP'); pass the Combiner file as --checkpoint and this one "
            "as --clip-checkpoint",
            path=path,
        )
    checkpoint = common.entry_checkpoint(
        payload, "Combiner", path=path, map_state=map_combiner, hparams={"dropout": 0.5}, what="Combiner"
    )
    if extra is not None:
        clip_payload = common.read_tensor_file(extra)
        checkpoint.clip_state = common.strip_prefix(
            common.tensor_entry(clip_payload, "CLIP", path=extra, what="fine-tuned CLIP")
        )
        checkpoint.dropped.update(
            {f"{extra.name}:{k}": common.BOOKKEEPING for k in clip_payload if k != "CLIP"}
        )
    return checkpoint
