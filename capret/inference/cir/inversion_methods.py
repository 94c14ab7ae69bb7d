"""The textual-inversion CIR methods behind ``capret-eval --method searle|searle-oti|pic2word|lincir``.

Each wraps the query functions of :mod:`capret.inference.cir.inversion` in the :class:`~capret.inference.cir.methods.
CirMethod` interface, so they are ranked, reranked, scored and compared with the shortcut baselines by the same
code as every other method:

* ``searle`` / ``pic2word`` / ``lincir`` read a trained mapper (``--mapper``: a ``capret-train`` checkpoint of
  task ``phi``, ``pic2word`` or ``lincir``); its sidecar names the frozen CLIP it was trained on, which
  ``--clip`` may override (the same weights stored elsewhere). The checkpoint's method must be the one asked
  for: a LinCIR phi evaluated as ``searle`` would silently report the wrong method.
* ``searle-oti`` needs no trained weights: every reference image's token is optimised at evaluation time (OTI,
  :func:`capret.inference.cir.oti.run_oti`, paper settings unless ``--oti-steps`` says otherwise) into a resumable
  token store keyed ``<dataset>/<reference>``, so a rerun optimises nothing.

On FashionIQ SEARLE, SEARLE-OTI and LinCIR read *both* orders of the two relative captions and average the
normalised query features, as SEARLE's evaluation does (LinCIR evaluates with SEARLE's code). Pic2Word builds one
query, ``"a photo of * , {c2} and {c1}"`` (its ``eval_utils.py``; the two forms' features differ, cosine
0.97-0.98), so ``pic2word`` reads that single order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from capret.config import ConfigError
from capret.inference.cir.features import CachedFeatures
from capret.inference.cir.inversion import (
    SEARLE_PROMPT,
    ZeroShotModel,
    load_zeroshot_model,
    searle_oti_query_features,
)
from capret.inference.cir.methods import CirMethod, CirQuerySet, MethodInputs
from capret.inference.cir.registry import register_cir_method
from capret.inference.cir.search import FeatureOptions
from capret.models.clip import ClipBundle

__all__ = ["MapperMethod", "OTIMethod"]

#: ``--method`` name -> the ``method`` a mapper checkpoint records
_MAPPER_METHODS = {"searle": "searle", "pic2word": "pic2word", "lincir": "lincir"}


def _orders(queries: CirQuerySet) -> list[list[str]]:
    return [list(o) for o in queries.caption_orders]


def _pic2word_orders(queries: CirQuerySet) -> list[list[str]]:
    """Pic2Word's one FashionIQ caption ``"{c2} and {c1}"`` (the second of the two orders); others unchanged."""
    return [[o[1]] if len(o) == 2 else list(o) for o in queries.caption_orders]


class MapperMethod(CirMethod):
    """SEARLE (phi), Pic2Word or LinCIR: a trained mapper turns the reference feature into the pseudo-word."""

    def __init__(self, model: ZeroShotModel, *, name: str, mapper: Path, clip_record: dict[str, Any]) -> None:
        super().__init__(model.clip, clip_record=clip_record)
        self.model = model
        self.name = name
        self.mapper = mapper

    def query_features(
        self, queries: CirQuerySet, *, images: CachedFeatures, options: FeatureOptions
    ) -> torch.Tensor:
        orders = _pic2word_orders(queries) if self.model.method == "pic2word" else _orders(queries)
        return self.model.query_features(
            reference_features=images.lookup(queries.references), captions=orders
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mapper": str(self.mapper), "prompt": self.model.template}


class OTIMethod(CirMethod):
    """SEARLE-OTI: each reference image's own optimised token in ``"a photo of $ that {caption}"``."""

    name = "searle-oti"

    def __init__(
        self,
        clip: ClipBundle,
        *,
        store: Path,
        config: Any,
        phrases: Any,
        progress: bool,
        clip_record: dict[str, Any],
    ) -> None:
        super().__init__(clip, clip_record=clip_record)
        self.store = store
        self.config = config
        self.phrases = phrases
        self.progress = progress
        self.reports: dict[str, dict[str, Any]] = {}

    def query_features(
        self, queries: CirQuerySet, *, images: CachedFeatures, options: FeatureOptions
    ) -> torch.Tensor:
        from dataclasses import asdict

        from capret.inference.cir.oti import TokenStore, run_oti

        keys = [f"{queries.dataset}/{ref}" for ref in queries.references]
        prefix = len(queries.dataset) + 1
        report = run_oti(
            self.clip,
            keys,
            load_image=lambda key: queries.load_image(key[prefix:]),
            store=self.store,
            config=self.config,
            phrases=self.phrases,
            progress=self.progress,
        )
        self.reports[queries.dataset] = asdict(report)
        tokens = TokenStore(self.store, token_width=self.clip.token_width).lookup(keys)
        placeholder = self.config.placeholder
        return searle_oti_query_features(
            self.clip,
            tokens=tokens,
            captions=_orders(queries),
            placeholder=placeholder,
            template=SEARLE_PROMPT.replace("$", placeholder),
        )

    def describe(self) -> dict[str, Any]:
        from capret.config import to_dict

        return {**super().describe(), "tokens": str(self.store), "oti": to_dict(self.config)}

    def report(self) -> dict[str, Any]:
        return dict(self.reports)


def _mapper_factory(name: str) -> Any:
    def factory(*, inputs: MethodInputs) -> CirMethod:
        if inputs.mapper is None:
            raise ConfigError(
                f"--method {name} needs --mapper (a capret-train {name} checkpoint or run folder)"
            )
        clip = inputs.clip.load(device=inputs.device) if inputs.clip is not None else None
        model = load_zeroshot_model(inputs.mapper, device=inputs.device, clip=clip)
        if model.method != _MAPPER_METHODS[name]:
            raise ConfigError(
                f"--mapper {inputs.mapper} holds a {model.method!r} mapper; evaluate it with --method {model.method}"
            )
        record = inputs.clip.record() if inputs.clip is not None else model.clip_config
        return MapperMethod(model, name=name, mapper=Path(inputs.mapper), clip_record=record)

    return factory


for _name in _MAPPER_METHODS:
    register_cir_method(_name)(_mapper_factory(_name))


@register_cir_method("searle-oti")
def _searle_oti(*, inputs: MethodInputs) -> CirMethod:
    from capret.inference.cir.concepts import PhraseBank
    from capret.inference.cir.oti import OTIConfig

    spec = inputs.require_clip("searle-oti")
    clip = spec.load(device=inputs.device)
    config = OTIConfig(**inputs.oti_settings)
    phrases = PhraseBank.load(inputs.oti_phrases) if inputs.oti_phrases is not None else None
    store = inputs.oti_tokens or inputs.work_dir / "oti_tokens.safetensors"
    return OTIMethod(
        clip,
        store=Path(store),
        config=config,
        phrases=phrases,
        progress=inputs.progress,
        clip_record=spec.record(),
    )
