"""Composed queries of the textual-inversion methods: SEARLE (phi or OTI), Pic2Word and LinCIR.

Each method turns the reference image into a pseudo-word token and reads the relative caption around it:

* SEARLE (Baldrati et al., ICCV 2023): token = phi(image feature) or the image's OTI token; prompt
  ``"a photo of $ that {caption}"``.
* Pic2Word (Saito et al., CVPR 2023): token = IM2TEXT(image feature); prompt ``"a photo of * , {caption}"``.
* LinCIR (Gu et al., CVPR 2024): token = phi(image feature) of the language-only phi; SEARLE's prompt.

The query is the normalised text feature of the prompt; with several caption *variants* per query (FashionIQ:
both orders of its two captions, as SEARLE evaluates) the normalised variant features are averaged and
renormalised. Features in, features out: reference features are the raw CLIP image features that
:mod:`capret.inference.cir.features` already stores for the gallery, so the same cache serves both.

A trained mapper (``capret-train`` tasks ``phi``, ``pic2word``, ``lincir``) is exported as a model folder of that
kind (:func:`save_mapper_folder`: ``mapper.safetensors`` + ``capret_model.json`` naming the frozen CLIP, the
mapper family and sizes); :func:`capret.load` (or :func:`load_zeroshot_model`) rebuilds it with its CLIP. Training
checkpoints still load, flat-keyed sidecars of the first configs included
(:func:`capret.models.zeroshot.upgrade_config_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.config import from_dict, to_dict
from capret.engine.checkpoint import load_model_weights
from capret.errors import CheckpointError
from capret.inference.model_kinds import load, register_model_kind
from capret.io import default_device, file_sha256, read_json, resolve_model_folder
from capret.models.clip import ClipBundle, TaskClipConfig, load_task_clip_config
from capret.models.folder import (
    MODEL_CONFIG_FILE,
    MODEL_MARKERS,
    ModelFolderError,
    folder_kind,
    read_model_config,
    read_weights,
    write_model_config,
    write_weights,
)
from capret.models.zeroshot import ZEROSHOT_TASKS, MapperRecord, build_mapper, upgrade_config_dict

__all__ = [
    "PIC2WORD_PROMPT",
    "SEARLE_PROMPT",
    "ZeroShotModel",
    "fashioniq_caption_variants",
    "lincir_query_features",
    "mapper_query_features",
    "load_zeroshot_model",
    "MAPPER_FORMAT",
    "pic2word_query_features",
    "save_mapper_folder",
    "pseudo_word_query_features",
    "searle_oti_query_features",
    "searle_query_features",
]

SEARLE_PROMPT = "a photo of $ that {caption}"
PIC2WORD_PROMPT = "a photo of * , {caption}"

Captions = Sequence[str] | Sequence[Sequence[str]]


def fashioniq_caption_variants(first: str, second: str) -> list[str]:
    """SEARLE's two FashionIQ captions: ``"c1 and c2"`` and ``"c2 and c1"`` (edges stripped of ``.?, ``)."""
    a, b = first.strip(".?, "), second.strip(".?, ")
    return [f"{a} and {b}", f"{b} and {a}"]


def _variants(captions: Captions) -> list[list[str]]:
    return [[c] if isinstance(c, str) else list(c) for c in captions]


@torch.no_grad()
def pseudo_word_query_features(
    clip: ClipBundle,
    tokens: torch.Tensor,
    captions: Captions,
    *,
    template: str,
    placeholder: str,
    batch_size: int = 256,
) -> torch.Tensor:
    """Normalised query features ``[N, d]``: ``template`` filled with each caption (variant), ``placeholder`` =
    ``tokens[i]``; the variants of one query are averaged (normalised) and renormalised."""
    groups = _variants(captions)
    if len(groups) != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} pseudo-tokens but {len(groups)} queries")
    if any(not g for g in groups):
        raise ValueError("every query needs at least one caption")
    texts = [template.format(caption=c) for g in groups for c in g]
    owner = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    feats = []
    for start in range(0, len(texts), batch_size):
        rows = owner[start : start + batch_size]
        vectors = tokens[rows].to(clip.device, dtype=clip.token_embedding.weight.dtype)
        out = clip.pseudo_token_features(texts[start : start + batch_size], vectors, placeholder=placeholder)
        feats.append(F.normalize(out.float(), dim=-1).cpu())
    summed = torch.zeros(len(groups), feats[0].shape[1]).index_add_(0, owner, torch.cat(feats))
    return F.normalize(summed, dim=-1)


@torch.no_grad()
def _mapped_tokens(mapper: nn.Module, features: torch.Tensor, device: torch.device) -> torch.Tensor:
    was_training = mapper.training
    mapper.eval()
    param = next(mapper.parameters())
    tokens = mapper(features.to(device, dtype=param.dtype))
    mapper.train(was_training)
    return tokens


def mapper_query_features(
    clip: ClipBundle,
    mapper: nn.Module,
    *,
    reference_features: torch.Tensor,
    captions: Captions,
    placeholder: str,
    template: str,
) -> torch.Tensor:
    """Composed queries of a mapper method: token = mapper(raw reference image feature), in the method's prompt.

    SEARLE's phi, Pic2Word's IM2TEXT and LinCIR's language-trained phi (applied to the *image* feature at
    inference) all build queries this way; only the prompt and its placeholder differ (the aliases below).
    """
    tokens = _mapped_tokens(mapper, reference_features, clip.device)
    return pseudo_word_query_features(clip, tokens, captions, template=template, placeholder=placeholder)


#: SEARLE queries: ``"a photo of $ that {caption}"`` with phi's token.
searle_query_features = partial(mapper_query_features, placeholder="$", template=SEARLE_PROMPT)
#: LinCIR queries: SEARLE's prompt with the language-trained phi's token.
lincir_query_features = partial(mapper_query_features, placeholder="$", template=SEARLE_PROMPT)
#: Pic2Word queries: ``"a photo of * , {caption}"`` with IM2TEXT's token.
pic2word_query_features = partial(mapper_query_features, placeholder="*", template=PIC2WORD_PROMPT)
#: SEARLE-OTI queries: the reference images' OTI tokens (``TokenStore.lookup(keys)``) in SEARLE's prompt.
searle_oti_query_features = partial(pseudo_word_query_features, placeholder="$", template=SEARLE_PROMPT)


@dataclass
class ZeroShotModel:
    """A trained mapper with the frozen CLIP it was trained on and its inference settings."""

    method: str  # searle | pic2word | lincir
    clip: ClipBundle
    mapper: nn.Module
    placeholder: str
    #: what the model folder records (frozen CLIP, mapper family and sizes, method, placeholder)
    record: MapperRecord

    @property
    def clip_config(self) -> dict[str, Any]:
        """The recorded CLIP section (backend, name, pretrained, preprocess, target_ratio), with the defaults
        filled in for sidecars that left some out."""
        return to_dict(self.record.clip)

    @property
    def template(self) -> str:
        """The method's inference prompt, written with this model's placeholder."""
        if self.method == "pic2word":
            return PIC2WORD_PROMPT.replace("*", self.placeholder)
        return SEARLE_PROMPT.replace("$", self.placeholder)

    def query_features(self, *, reference_features: torch.Tensor, captions: Captions) -> torch.Tensor:
        """Normalised composed queries with the method's own prompt."""
        return mapper_query_features(
            self.clip,
            self.mapper,
            reference_features=reference_features,
            captions=captions,
            placeholder=self.placeholder,
            template=self.template,
        )


MAPPER_FORMAT = "capret.mapper/1"
_MAPPER_FILE = "mapper.safetensors"


def save_mapper_folder(
    folder: str | Path,
    *,
    kind: str,
    mapper: nn.Module,
    record: MapperRecord,
    trained_from: dict[str, Any] | None = None,
) -> Path:
    """Write a mapper model folder (kind ``phi``, ``pic2word`` or ``lincir``): ``mapper.safetensors`` and a
    ``capret_model.json`` whose config names the frozen CLIP, the mapper family and sizes, method and placeholder."""
    if kind not in ZEROSHOT_TASKS:
        raise CheckpointError(
            f"kind {kind!r} is not a mapper kind ({', '.join(ZEROSHOT_TASKS)})", path=folder
        )
    folder = Path(folder)
    weights = write_weights(folder / _MAPPER_FILE, mapper, format=MAPPER_FORMAT)
    extra = {"trained_from": trained_from} if trained_from is not None else {}
    write_model_config(
        folder,
        kind=kind,
        format=MAPPER_FORMAT,
        config=to_dict(record),
        sha256={_MAPPER_FILE: file_sha256(weights)},
        **extra,
    )
    return folder


def _record_from_checkpoint(folder: Path) -> MapperRecord:
    """The :class:`MapperRecord` of a training checkpoint, from the task config its sidecar recorded."""
    sidecar = read_json(folder / "checkpoint.json", what="checkpoint sidecar", allow_nonfinite=True)
    task = upgrade_config_dict((sidecar.get("config") or {}).get("task") or {})
    info = task.get("zeroshot")
    if not isinstance(info, dict) or task.get("task") not in ZEROSHOT_TASKS:
        raise CheckpointError(
            f"sidecar task is {task.get('task')!r}; a zero-shot mapper checkpoint comes from capret-train tasks "
            "phi, pic2word or lincir",
            path=folder,
        )
    clip = from_dict(TaskClipConfig, (task.get("model") or {}).get("clip") or {})
    return MapperRecord(
        clip=clip,
        method=info["method"],
        mapper=info["mapper"],
        hparams=dict(info["hparams"]),
        placeholder=info["placeholder"],
    )


def _load_mapper_folder(
    folder: Path, *, device: str | torch.device | None = None, clip: ClipBundle | None = None
) -> ZeroShotModel:
    target = default_device(device)
    if (folder / MODEL_CONFIG_FILE).is_file():
        meta = read_model_config(folder, format=MAPPER_FORMAT)
        record = from_dict(MapperRecord, meta["config"])
        mapper = read_weights(
            build_mapper(record.mapper, record.hparams),
            folder / _MAPPER_FILE,
            sha256=(meta.get("sha256") or {}).get(_MAPPER_FILE),
            device=target,
        )
    else:
        record = _record_from_checkpoint(folder)
        mapper = load_model_weights(build_mapper(record.mapper, record.hparams), folder, device=target)
    if clip is None:
        clip = load_task_clip_config(record.clip, device=target)
    if clip.token_width != record.hparams["output_dim"]:
        raise CheckpointError(
            f"mapper outputs {record.hparams['output_dim']}-wide tokens but {clip.name} tokens are "
            f"{clip.token_width} wide",
            path=folder,
        )
    return ZeroShotModel(
        method=record.method,
        clip=clip.requires_grad_(False).eval(),
        mapper=mapper.to(target).eval(),
        placeholder=record.placeholder,
        record=record,
    )


for _kind in ZEROSHOT_TASKS:
    register_model_kind(_kind)(_load_mapper_folder)


def load_zeroshot_model(
    checkpoint: str | Path, *, device: str | torch.device = "cpu", clip: ClipBundle | None = None
) -> ZeroShotModel:
    """Mapper + frozen CLIP of a ``phi``/``pic2word``/``lincir`` model folder, checkpoint or run folder
    (:func:`capret.load`). ``clip`` reuses an already loaded backbone instead of loading the recorded one."""
    if clip is None:
        model = load(checkpoint, device=device)
    else:  # the caller's CLIP: open the folder with the same loader, bypassing only the CLIP
        folder = resolve_model_folder(checkpoint, markers=MODEL_MARKERS)
        kind = folder_kind(folder)
        if kind not in ZEROSHOT_TASKS:
            raise ModelFolderError(f"holds a {kind!r} model, not a zero-shot mapper", path=folder)
        model = _load_mapper_folder(folder, device=device, clip=clip)
    if not isinstance(model, ZeroShotModel):
        raise ModelFolderError(
            f"holds a {type(model).__name__}, not a zero-shot mapper (kinds {', '.join(ZEROSHOT_TASKS)})",
            path=checkpoint,
        )
    return model
