"""Mapping networks of the zero-shot composed-retrieval methods: a CLIP feature in, a pseudo-word token out.

The predicted vector lives in the *input* token-embedding space of the CLIP text encoder and is injected for a
placeholder word (:meth:`capret.models.clip_base.ClipBundle.pseudo_token_features`).

* :class:`Phi` — SEARLE's textual-inversion network (Baldrati et al., ICCV 2023, Sec. 4.2): a 3-layer MLP with
  GELU and dropout 0.5, hidden width 4x the input (512 -> 2048 -> 512 for ViT-B/32). LinCIR (Gu et al., CVPR
  2024) uses the same shape with the CLIP *text* projection size as input and the token width as output.
* :class:`Pic2WordMapper` — Pic2Word's IM2TEXT (Saito et al., CVPR 2023): two blocks of Linear -> 512,
  Dropout 0.1, ReLU, then Linear(512 -> token width).

Each module records its sizes in ``hparams`` so a checkpoint can be rebuilt from its sidecar alone.

The configs of the three mapper tasks' models live here too (:class:`MapperModelConfig`, and
:class:`MapperRecord`: what a ``phi`` / ``pic2word`` / ``lincir`` model folder records), with
:func:`upgrade_config_dict` for the first, flat-keyed sidecars: the tasks (:mod:`capret.tasks.zeroshot_common`)
and inference (:mod:`capret.inference.cir.inversion`) both read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from capret.config import cfg, move_flat_keys, same_name_in
from capret.errors import CheckpointError
from capret.models.clip import FLAT_CLIP_FEATURE_KEYS, TaskClipConfig

__all__ = [
    "MAPPERS",
    "ZEROSHOT_TASKS",
    "MapperModelConfig",
    "MapperRecord",
    "Phi",
    "Pic2WordMapper",
    "build_mapper",
    "upgrade_config_dict",
]

#: the ``capret-train`` tasks that train a mapper (each is also the ``kind`` of its exported model folder)
ZEROSHOT_TASKS = ("phi", "pic2word", "lincir")


class _Mapper(nn.Module):
    """Three linear layers ``in -> hidden -> hidden -> out`` with the same ``activation`` block after the first two;
    ``hparams`` are what :func:`build_mapper` rebuilds it from."""

    def __init__(
        self,
        *,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        dropout: float,
        activation: Callable[[], list[nn.Module]],
    ) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = {
            "input_dim": input_dim,
            "hidden_dim": hidden_dim,
            "output_dim": output_dim,
            "dropout": dropout,
        }
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            *activation(),
            nn.Linear(hidden_dim, hidden_dim),
            *activation(),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class Phi(_Mapper):
    """SEARLE/LinCIR phi: ``Linear(in, h) GELU Drop Linear(h, h) GELU Drop Linear(h, out)``."""

    def __init__(
        self, input_dim: int, *, hidden_dim: int | None = None, output_dim: int, dropout: float = 0.5
    ):
        super().__init__(
            input_dim=input_dim,
            hidden_dim=hidden_dim or 4 * input_dim,
            output_dim=output_dim,
            dropout=dropout,
            activation=lambda: [nn.GELU(), nn.Dropout(dropout)],
        )


class Pic2WordMapper(_Mapper):
    """Pic2Word IM2TEXT: ``2 x [Linear -> hidden, Dropout(0.1), ReLU]`` then ``Linear(hidden -> out)``."""

    def __init__(self, input_dim: int, *, hidden_dim: int = 512, output_dim: int, dropout: float = 0.1):
        super().__init__(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            output_dim=output_dim,
            dropout=dropout,
            activation=lambda: [nn.Dropout(dropout), nn.ReLU()],
        )


#: mapper family name -> class (the name is recorded in checkpoints)
MAPPERS: dict[str, type[nn.Module]] = {"phi": Phi, "pic2word": Pic2WordMapper}


def build_mapper(kind: str, hparams: dict[str, Any]) -> nn.Module:
    """Rebuild a mapper from its family name and ``hparams`` (as stored in a checkpoint sidecar)."""
    if kind not in MAPPERS:
        raise CheckpointError(f"mapper family {kind!r} is unknown; valid: {', '.join(sorted(MAPPERS))}")
    args = dict(hparams)
    return MAPPERS[kind](args.pop("input_dim"), **args)


# ------------------------------------------------------------------------------------------------ the configs


@dataclass
class MapperModelConfig:
    """The frozen CLIP and the trainable mapper on top of it."""

    clip: TaskClipConfig = cfg(
        factory=TaskClipConfig, help="frozen CLIP backbone and its image preprocessing"
    )
    hidden_dim: int = cfg(0, "mapper hidden width; 0 = 4 x CLIP feature size")
    dropout: float = cfg(0.5, "mapper dropout")
    placeholder: str = cfg("$", "pseudo-word placeholder (one token of the CLIP tokenizer)")


@dataclass
class MapperRecord:
    """What a mapper model folder records as its ``config``: the frozen CLIP, the mapper family and its sizes,
    and how inference uses it (method and placeholder)."""

    clip: TaskClipConfig = cfg(factory=TaskClipConfig, help="the frozen CLIP the mapper was trained on")
    method: str = cfg("searle", "zero-shot method the mapper serves: searle | pic2word | lincir")
    mapper: str = cfg("phi", "mapper family (a key of MAPPERS)")
    hparams: dict[str, Any] = cfg(
        factory=dict, help="the mapper's sizes (input_dim, hidden_dim, output_dim, ...)"
    )
    placeholder: str = cfg("$", "pseudo-word placeholder of the prompt")


#: where each key of the flat config of the first zero-shot checkpoints now lives
_FLAT_KEYS: dict[str, tuple[str, ...]] = {
    **same_name_in("data", "images", "captions", "tokens", "phrases", "limit", "batch_size"),
    **same_name_in("model", "hidden_dim", "dropout", "placeholder"),
    **same_name_in("loss", "prompt", "temperature", "lambda_distil", "lambda_gpt", "top_k_concepts", "noise"),
    **same_name_in("trainer", "lr", "weight_decay"),
    **FLAT_CLIP_FEATURE_KEYS,
}

#: flat keys a task carried without using them (dropped on upgrade)
_UNUSED: dict[str, frozenset[str]] = {"lincir": frozenset({"feature_cache"})}


def upgrade_config_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A ``phi``/``pic2word``/``lincir`` config dict in today's sectioned shape.

    The first checkpoints of these tasks recorded a flat config (``clip``, ``images``, ``lr``, ``hidden_dim``,
    ...); each key is moved to where :data:`_FLAT_KEYS` says it lives now (a flat ``clip`` section becomes
    ``model.clip``; flat ``lr``/``weight_decay`` win over the trainer's, which those tasks did not read). A dict
    already in today's shape, or of another task, is returned unchanged, so this is safe on any sidecar.
    """
    if raw.get("task") not in ZEROSHOT_TASKS or "model" in raw or "data" in raw:
        return raw
    unused = _UNUSED.get(str(raw["task"]), frozenset())
    out: dict[str, Any] = {
        k: v for k, v in raw.items() if k not in _FLAT_KEYS and k != "clip" and k not in unused
    }
    out["trainer"] = dict(out.get("trainer") or {})
    clip = raw.get("clip")
    if clip is not None:
        section = {"backend": "hf", "name": clip} if isinstance(clip, str) else dict(clip)
        out.setdefault("model", {})["clip"] = section
    move_flat_keys(raw, out, _FLAT_KEYS, skip=unused)
    return out
