"""Released checkpoints of the composed-retrieval papers mapped onto capret's modules (tensors only, no pickle).

One module per source project; each reads the layout that project's public code saves and returns a
:class:`MappedCheckpoint`: the tensors renamed to capret's modules, the module sizes they imply, and every
checkpoint entry accounted for (mapped, or dropped with the reason).

========== ============================================================ =============================================
source     released file (what the project's code saves)               capret module
========== ============================================================ =============================================
searle     ``SEARLE_ViT-B32.pt`` / ``SEARLE_ViT-L14.pt``: ``{"Phi": sd}``  :class:`capret.models.zeroshot.Phi`
lincir     ``lincir_large.pt`` (``save_phi``): ``{"epoch", "Phi": sd}``  :class:`capret.models.zeroshot.Phi`
pic2word   ``pic2word_model.pt``: ``{"epoch", "name", "state_dict",     :class:`capret.models.zeroshot.Pic2WordMapper`
           "state_dict_img2text", "optimizer"}``, ``module.`` prefixes   (+ the CLIP, checked against the backbone)
clip4cir   ``{"epoch", "Combiner": sd}`` and ``{"epoch", "CLIP": sd}``    :class:`capret.models.combiner.Combiner` (+ the
           (two files, ``utils.save_model``)                             fine-tuned OpenAI-layout CLIP on open_clip)
========== ============================================================ =============================================

The folder writing (model folders that ``capret-eval cir`` and :func:`capret.load` open) lives in
:mod:`capret.tasks.released`, beside the tasks whose exports it writes.
"""

from __future__ import annotations

from capret.models.convert.common import (
    MappedCheckpoint,
    map_openai_clip,
    openai_to_hf_clip,
    read_tensor_file,
    strip_prefix,
)
from capret.models.convert.registry import (
    CONVERTERS,
    SourceSpec,
    convert_file,
    get_converter,
    list_converters,
)

__all__ = [
    "CONVERTERS",
    "MappedCheckpoint",
    "SourceSpec",
    "convert_file",
    "get_converter",
    "list_converters",
    "map_openai_clip",
    "openai_to_hf_clip",
    "read_tensor_file",
    "strip_prefix",
]
