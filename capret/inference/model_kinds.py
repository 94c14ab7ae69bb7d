"""One loader for every exported model: the registry of model *kinds* behind :func:`capret.load`.

A model folder says what it holds in ``capret_model.json``'s ``kind`` (:mod:`capret.models.folder`); each kind
registers one loader here, and :func:`load` resolves the folder (a run folder's ``model/``, ``best/`` or newest
checkpoint), reads or infers its kind, and calls that loader. The registry is lazy — it names the module that
registers each built-in kind — so ``import capret`` stays light and a kind's heavy imports (torchvision for
the detector, transformers for CLIP) happen only when such a folder is opened.

Built-in kinds and what :func:`load` returns for them:

========== ========================================================== ===========================================
kind       written by                                                 returns
========== ========================================================== ===========================================
dualstream ``capret-train`` task ``dualstream``                       :class:`~capret.inference.dualstream.encoding.RetrievalModel`
detector   task ``detector``                                          :class:`~capret.inference.detectors.TrainedDetector`
combiner   task ``combiner`` (stage 1 or 2)                           :class:`~capret.inference.cir.combiner.CombinerModel`
phi        task ``phi`` (SEARLE)                                      :class:`~capret.inference.cir.inversion.ZeroShotModel`
pic2word   task ``pic2word``                                          :class:`~capret.inference.cir.inversion.ZeroShotModel`
lincir     task ``lincir``                                            :class:`~capret.inference.cir.inversion.ZeroShotModel`
clip       task ``clip``                                              :class:`~capret.models.openclip.OpenClipBundle`
========== ========================================================== ===========================================

A new kind (a new task's export, a checkpoint converter's output) registers its loader with
:func:`register_model_kind` in the inference module that owns its typed model, and adds that module to
``_LAZY`` below so :func:`load` finds it without the caller importing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from capret.io import resolve_model_folder
from capret.models.folder import MODEL_MARKERS, ModelFolderError, folder_kind
from capret.registry import Registry

__all__ = ["ModelLoader", "list_model_kinds", "load", "register_model_kind"]

#: ``loader(folder, *, device) -> typed model``; ``folder`` is already resolved to the model folder itself
ModelLoader = Callable[..., Any]

_LAZY = {
    "dualstream": "capret.inference.dualstream.encoding",
    "detector": "capret.inference.detectors",
    "combiner": "capret.inference.cir.combiner",
    "phi": "capret.inference.cir.inversion",
    "pic2word": "capret.inference.cir.inversion",
    "lincir": "capret.inference.cir.inversion",
    "clip": "capret.inference.clip_model",
}

_KINDS: Registry[ModelLoader] = Registry("model kind", lazy_modules=_LAZY)


def register_model_kind(kind: str) -> Callable[[ModelLoader], ModelLoader]:
    """Decorator: ``loader(folder: Path, *, device) -> model`` opens folders whose ``kind`` is ``kind``."""

    def decorator(loader: ModelLoader) -> ModelLoader:
        _KINDS.register(kind)(lambda: loader)
        return loader

    return decorator


def list_model_kinds() -> list[str]:
    """Every kind :func:`load` can open."""
    return _KINDS.names()


def load(path: str | Path, *, kind: str | None = None, device: str | torch.device | None = None) -> Any:
    """Open any exported capret model folder (or a run folder / training checkpoint) as its typed model.

    Args:
        path: a model folder (``capret_model.json``), a training checkpoint (``checkpoint.json``), or a run
            folder holding ``model/``, ``best/`` or ``checkpoints/step_*`` (the first found wins).
        kind: if given, the folder must hold this kind; a mismatch is an error naming both, so a caller that
            needs, say, a detector never gets a retrieval model by mistake.
        device: where the weights go (default: the kind's own default, CPU or the first GPU).

    Raises:
        ModelFolderError: the folder says no kind, a kind nothing registers, or not the requested ``kind``.
    """
    folder = resolve_model_folder(path, markers=MODEL_MARKERS)
    found = folder_kind(folder)
    if kind is not None and found != kind:
        raise ModelFolderError(f"holds a {found!r} model, not the {kind!r} model asked for", path=folder)
    if found not in _KINDS:
        raise ModelFolderError(
            f"kind {found!r} has no loader; known kinds: {', '.join(list_model_kinds())}", path=folder
        )
    loader = _KINDS.create(found)
    return loader(folder, device=device)
