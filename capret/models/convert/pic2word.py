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
from capret.models.convert.common import (
    MAPPER_SIZES,
    MappedCheckpoint,
    check_module_state,
    read_tensor_file,
    rename_by_rules,
    strip_prefix,
    tensor_entry,
    unused_entries,
)
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
    out, mapping, unmatched = rename_by_rules(state, _RULES)
    sizes = check_module_state(
        out,
        path=path,
        unmatched=unmatched,
        sizes=MAPPER_SIZES,
        build=Pic2WordMapper,
        what="IM2TEXT (n_layer=2)",
    )
    return out, mapping, sizes


def convert_pic2word(path: Path, *, extra: Path | None = None) -> MappedCheckpoint:
    """Pic2Word's checkpoint -> :class:`capret.models.zeroshot.Pic2WordMapper` (dropout 0.1) + its CLIP."""
    if extra is not None:
        raise CheckpointError(
            f"{extra}: Pic2Word's checkpoint holds its CLIP; --clip-checkpoint is for clip4cir", path=extra
        )
    payload = read_tensor_file(path)
    im2text = strip_prefix(tensor_entry(payload, "state_dict_img2text", path=path, what="IM2TEXT"))
    state, mapping, sizes = map_im2text(im2text, path=path)
    clip_state = strip_prefix(tensor_entry(payload, "state_dict", path=path, what="CLIP"))
    dropped, metadata = unused_entries(
        payload, used=("state_dict_img2text", "state_dict"), reason="training bookkeeping, not a weight"
    )
    return MappedCheckpoint(
        state=state,
        hparams={**sizes, "dropout": 0.1},
        mapped={f"state_dict_img2text.module.{k}": v for k, v in mapping.items()},
        dropped=dropped,
        clip_state=clip_state,
        metadata=metadata,
    )
