"""Pic2Word's released checkpoint (google-research/composed_image_retrieval): ``pic2word_model.pt``.

``src/main.py`` saves ``{"epoch", "name", "state_dict": clip.state_dict(), "state_dict_img2text":
img2text.state_dict(), "optimizer"}`` from DDP-wrapped models, so both state dicts carry ``module.`` prefixes.
``model/model.py``'s ``IM2TEXT(embed_dim, middle_dim=512, output_dim, n_layer=2, dropout=0.1)`` holds
``layers.{i}`` = Sequential(Linear, Dropout, ReLU) and ``fc_out``; :class:`capret.models.zeroshot.Pic2WordMapper`
is the same network flattened into one Sequential:

=========================  ==================
Pic2Word                   capret
=========================  ==================
``layers.0.0.{w,b}``       ``layers.0.{w,b}``
``layers.1.0.{w,b}``       ``layers.3.{w,b}``
``fc_out.{w,b}``           ``layers.6.{w,b}``
=========================  ==================

The CLIP in ``state_dict`` is frozen during Pic2Word's training (only IM2TEXT's parameters are in the optimizer)
and in OpenAI's layout; it is returned as ``clip_state`` so the writer can check it against ``--clip`` (and keep
it if it differs). The optimizer state is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from capret.errors import CheckpointError
from capret.models.convert import common
from capret.models.zeroshot import Pic2WordMapper

__all__ = ["convert_pic2word", "map_im2text"]

_RULES = (
    (re.compile(r"layers\.0\.0\.(weight|bias)"), r"layers.0.\1"),
    (re.compile(r"layers\.1\.0\.(weight|bias)"), r"layers.3.\1"),
    (re.compile(r"fc_out\.(weight|bias)"), r"layers.6.\1"),
)


def map_im2text(
    state: dict[str, Tensor], *, path: Path
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, int]]:
    """IM2TEXT's state dict (prefixes stripped) in :class:`Pic2WordMapper`'s names; ``(state, mapping, sizes)``."""
    # unmatched: e.g. layers.2.0.* of an n_layer=3 IM2TEXT, which our mapper does not have
    return common.map_module_state(
        state, _RULES, path=path, sizes=common.MAPPER_SIZES, build=Pic2WordMapper, what="IM2TEXT (n_layer=2)"
    )


def convert_pic2word(path: Path, *, extra: Path | None = None) -> common.MappedCheckpoint:
    """Pic2Word's checkpoint -> :class:`capret.models.zeroshot.Pic2WordMapper` (dropout 0.1) + its CLIP."""
    if extra is not None:
        raise CheckpointError(
            f"{extra}: Pic2Word's checkpoint holds its CLIP; --clip-checkpoint is for clip4cir", path=extra
        )
    payload = common.read_tensor_file(path)
    checkpoint = common.entry_checkpoint(
        payload,
        "state_dict_img2text",
        path=path,
        map_state=map_im2text,
        hparams={"dropout": 0.1},
        what="IM2TEXT",
        also_used=("state_dict",),
    )
    checkpoint.clip_state = common.strip_prefix(
        common.tensor_entry(payload, "state_dict", path=path, what="CLIP")
    )
    return checkpoint
