"""Which released checkpoints ``capret convert-checkpoint --from`` reads, and what each becomes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capret.models.convert.clip4cir import convert_clip4cir
from capret.models.convert.common import MappedCheckpoint
from capret.models.convert.lincir import convert_lincir
from capret.models.convert.pic2word import convert_pic2word
from capret.models.convert.searle import convert_searle
from capret.registry import Registry

__all__ = ["CONVERTERS", "SourceSpec", "get_converter", "list_converters"]


@dataclass(frozen=True)
class SourceSpec:
    """A source project: how its file is read and which capret model it becomes."""

    name: str
    #: the capret model kind / ``capret-train`` task the folder is written as (phi, pic2word, lincir, combiner)
    kind: str
    #: ``capret-eval cir --method`` that evaluates it
    method: str
    #: the CLIP family the project itself runs (its checkpoints' CLIP weights are in that family's layout)
    backend: str
    #: the pseudo-word placeholder of the project's prompts ("" for the Combiner)
    placeholder: str
    convert: Callable[..., MappedCheckpoint]


CONVERTERS: Registry[SourceSpec] = Registry("checkpoint source")

for _spec in (
    SourceSpec("searle", "phi", "searle", "open_clip", "$", convert_searle),
    SourceSpec("pic2word", "pic2word", "pic2word", "open_clip", "*", convert_pic2word),
    SourceSpec("lincir", "lincir", "lincir", "hf", "$", convert_lincir),
    SourceSpec("clip4cir", "combiner", "combiner", "open_clip", "", convert_clip4cir),
):
    CONVERTERS.register(_spec.name)(lambda spec=_spec: spec)


def get_converter(name: str) -> SourceSpec:
    """The spec of source ``name``; an unknown name raises listing the valid sources."""
    return CONVERTERS.create(name)


def list_converters() -> list[str]:
    return CONVERTERS.names()


def convert_file(name: str, path: Path, *, extra: Path | None = None) -> MappedCheckpoint:
    """Read and map the released file of source ``name``."""
    return get_converter(name).convert(path, extra=extra)
