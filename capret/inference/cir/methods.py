"""Composed-retrieval methods behind one interface, chosen by name, plus the shortcut baselines.

A *method* turns a benchmark's queries (reference image + relative caption) into L2-normalised query features
in the space of one CLIP's image features; the gallery is always that CLIP's image features, so every method
is ranked, reranked and scored by the same code (:func:`search_methods`, and the benchmarks' protocols in
:mod:`capret.inference.cir.benchmarks`, whose adapters build the :class:`CirQuerySet` of each benchmark).

Built-in methods (``list_cir_methods()``):

* ``combiner`` — a trained CLIP4Cir checkpoint (stage-1 element-wise sum or stage-2 Combiner);
* ``image-only`` / ``text-only`` / ``sum`` — the shortcut baselines: the reference image's feature, the
  relative caption's feature, and ``normalize(normalize(img) + normalize(txt))`` (the "Image + Text" baseline
  of the zero-shot papers). Recent studies show many benchmark queries are solvable from one modality alone,
  so :func:`search_methods` reports these beside any method, computed with the method's own CLIP;
* ``cirevl`` — training-free caption-then-rewrite (:mod:`capret.inference.cir.cirevl`);
* the textual-inversion methods (``searle``, ``searle-oti``, ``pic2word``, ``lincir``) register from
  :mod:`capret.inference.cir.inversion_methods`.

The registry itself is :mod:`capret.inference.cir.registry` (light, for ``--help``).

New methods register with :func:`register_cir_method`; a factory takes one :class:`MethodInputs` and reads the
fields it needs (a combiner checkpoint, a CLIP, a mapper, a captioner).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.config import ConfigError, to_dict
from capret.errors import DataError
from capret.evaluation.cir import rank_gallery
from capret.inference.cir.cirevl import CirevlOptions, CirevlReport, edited_descriptions
from capret.inference.cir.features import CachedFeatures, image_features, text_features
from capret.inference.cir.registry import METHODS, list_cir_methods, register_cir_method
from capret.inference.cir.search import TOP_K, CIRRanking, FeatureOptions, compose_queries
from capret.inference.model_kinds import load
from capret.models.clip import ClipBundle, load_clip
from capret.models.folder import MODEL_CONFIG_FILE, ModelFolderError

__all__ = [
    "BASELINES",
    "CirMethod",
    "CirQuerySet",
    "ClipSpec",
    "MethodInputs",
    "create_cir_method",
    "list_cir_methods",
    "register_cir_method",
    "search_methods",
]

#: the shortcut baselines reported beside every method
BASELINES: tuple[str, ...] = ("image-only", "text-only", "sum")


@dataclass
class CirQuerySet:
    """The queries of one benchmark unit (a FashionIQ category, CIRR, CIRCO) as every method reads them."""

    dataset: str  # namespace of cache keys, e.g. "cirr", "fashioniq/dress"
    references: list[str]  # reference image name per query (``load_image(name)`` opens it)
    captions: list[str]  # the relative caption per query (FashionIQ: "C1 and c2", CLIP4Cir's pairing)
    #: every order of a query's captions ("c1 and c2", "c2 and c1" on FashionIQ); SEARLE-style methods
    #: average the query features over them, the others read ``captions``
    caption_orders: list[tuple[str, ...]]
    load_image: Callable[[str], Any]

    def __post_init__(self) -> None:
        n = len(self.references)
        if len(self.captions) != n or len(self.caption_orders) != n:
            raise DataError(
                f"{self.dataset}: {n} references, {len(self.captions)} captions and "
                f"{len(self.caption_orders)} caption-order tuples; they must match"
            )


class CirMethod(abc.ABC):
    """Query features for a :class:`CirQuerySet`, in the image-feature space of :attr:`clip`."""

    name: str = ""

    def __init__(self, clip: ClipBundle, *, clip_record: dict[str, Any] | None = None) -> None:
        self.clip = clip
        #: how the CLIP was loaded (backend, name, pretrained), for the output
        self.clip_record = clip_record or {"name": clip.name}

    @abc.abstractmethod
    def query_features(
        self, queries: CirQuerySet, *, images: CachedFeatures, options: FeatureOptions
    ) -> torch.Tensor:
        """L2-normalised query features ``[Q, d]``; ``images`` holds raw features of every reference."""

    def describe(self) -> dict[str, Any]:
        """What the output records about the method (model names, checkpoints, prompts)."""
        return {"method": self.name, "clip": self.clip_record}

    def report(self) -> dict[str, Any]:
        """Counts of the last run worth reporting (e.g. CIReVL's cached calls and fallbacks); {} if none."""
        return {}


def _texts(clip: ClipBundle, texts: Sequence[str], options: FeatureOptions) -> torch.Tensor:
    cache = options.cache_dir if options.cache_texts else None
    feats = text_features(clip, texts, cache_dir=cache, fingerprint=options.text_fingerprint)
    return feats.lookup(texts)


class ImageOnly(CirMethod):
    """Shortcut baseline: the reference image's own feature (ignores the caption)."""

    name = "image-only"

    def query_features(
        self, queries: CirQuerySet, *, images: CachedFeatures, options: FeatureOptions
    ) -> torch.Tensor:
        return F.normalize(images.lookup(queries.references).float(), dim=-1)


class TextOnly(CirMethod):
    """Shortcut baseline: the relative caption's text feature (ignores the reference image)."""

    name = "text-only"

    def query_features(
        self, queries: CirQuerySet, *, images: CachedFeatures, options: FeatureOptions
    ) -> torch.Tensor:
        return F.normalize(_texts(self.clip, queries.captions, options).float(), dim=-1)


class Sum(CirMethod):
    """Shortcut baseline: ``normalize(normalize(image) + normalize(text))``.

    Each modality is normalised first because raw CLIP image and text features differ in norm, and an
    unweighted sum of raw features would be decided by whichever is longer.
    """

    name = "sum"

    def query_features(
        self, queries: CirQuerySet, *, images: CachedFeatures, options: FeatureOptions
    ) -> torch.Tensor:
        image = F.normalize(images.lookup(queries.references).float(), dim=-1)
        text = F.normalize(_texts(self.clip, queries.captions, options).float(), dim=-1)
        return F.normalize(image + text, dim=-1)


class FuserMethod(CirMethod):
    """A trained CLIP4Cir model: ``fuser(raw image feature, raw text feature)`` (``checkpoint`` None while it is
    still being trained: the ``combiner`` task's validation)."""

    name = "combiner"

    def __init__(
        self,
        clip: ClipBundle,
        *,
        fuser: nn.Module,
        checkpoint: Path | None,
        stage: int,
        clip_record: dict[str, Any],
    ) -> None:
        super().__init__(clip, clip_record=clip_record)
        self.fuser = fuser
        self.checkpoint = checkpoint
        self.stage = stage

    def query_features(
        self, queries: CirQuerySet, *, images: CachedFeatures, options: FeatureOptions
    ) -> torch.Tensor:
        return compose_queries(
            self.fuser,
            images=images.lookup(queries.references),
            texts=_texts(self.clip, queries.captions, options),
            device=self.clip.device,
        )

    def describe(self) -> dict[str, Any]:
        checkpoint = str(self.checkpoint) if self.checkpoint is not None else None
        return {**super().describe(), "checkpoint": checkpoint, "stage": self.stage}


CLIP_BACKENDS: tuple[str, ...] = ("hf", "open_clip")


@dataclass
class ClipSpec:
    """Which CLIP a method without its own checkpoint uses (``--clip``, ``--clip-backend``, ...)."""

    name: str  # hub id / local folder (hf) or architecture name (open_clip)
    backend: str = "hf"  # hf | open_clip
    pretrained: str | None = None  # open_clip pretrained tag or weights file
    preprocess: str = "targetpad"  # targetpad | squarepad | none
    target_ratio: float = 1.25

    def record(self) -> dict[str, Any]:
        return {"backend": self.backend, "name": self.name, "pretrained": self.pretrained}

    def load(self, *, device: str | torch.device) -> ClipBundle:
        """The CLIP: an exported ``clip`` model folder through :func:`capret.load` (its own weights and
        preprocessing), else a hub id / local Hugging Face folder / open_clip architecture."""
        if (Path(self.name) / MODEL_CONFIG_FILE).is_file():
            bundle = load(self.name, kind="clip", device=device)
            if not isinstance(bundle, ClipBundle):
                raise ModelFolderError(f"kind 'clip' loaded a {type(bundle).__name__}", path=self.name)
            return bundle.eval()
        if self.backend not in CLIP_BACKENDS:
            raise ConfigError(
                f"--clip-backend {self.backend!r} is not valid; choose one of {', '.join(CLIP_BACKENDS)}"
            )
        if self.backend == "hf" and self.pretrained:
            raise ConfigError("--clip-pretrained applies to --clip-backend open_clip only")
        return load_clip(
            self.name,
            backend=self.backend,  # type: ignore[arg-type]
            pretrained=self.pretrained,
            preprocess=self.preprocess,  # type: ignore[arg-type]
            target_ratio=self.target_ratio,
            device=device,
        ).eval()


@dataclass
class CaptionerSpec:
    """The caption backend of ``cirevl``: a registry name and that backend's own keyword options."""

    backend: str = "template"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodInputs:
    """Everything a method factory may read; each method uses only its own fields (and says which)."""

    device: str | torch.device = "cpu"
    work_dir: Path = Path(".")  # where methods keep their caches (CIReVL caption store, OTI tokens)
    checkpoint: Path | None = None  # combiner checkpoint or run folder
    clip: ClipSpec | None = None  # CLIP of methods without a combiner checkpoint
    mapper: Path | None = None  # phi / Pic2Word / LinCIR checkpoint
    captioner: CaptionerSpec = field(default_factory=CaptionerSpec)
    caption_store: Path | None = None  # CIReVL store (default: <work_dir>/cirevl_<backend>.jsonl)
    caption_batch_size: int = 16
    cirevl_settings: dict[str, Any] = field(
        default_factory=dict
    )  # CirevlOptions fields (prompts, limits, ...)
    oti_tokens: Path | None = None  # SEARLE-OTI token store (default: <work_dir>/oti_tokens.safetensors)
    oti_phrases: Path | None = None  # SEARLE-OTI regulariser phrases (capret oti's phrase file); None = off
    oti_settings: dict[str, Any] = field(default_factory=dict)  # OTIConfig fields to change (steps, ...)
    progress: bool = True

    def require_clip(self, method: str) -> ClipSpec:
        if self.clip is None:
            raise ConfigError(
                f"--method {method} needs a CLIP: --clip NAME (hub id or folder; with --clip-backend "
                "open_clip an architecture such as ViT-L-14 and --clip-pretrained TAG)"
            )
        return self.clip


def create_cir_method(name: str, inputs: MethodInputs) -> CirMethod:
    """Build the method ``name`` (:func:`list_cir_methods`); an unknown name lists the valid ones."""
    method = METHODS.create(name, inputs=inputs)
    if not isinstance(method, CirMethod):
        raise TypeError(f"CIR method factory {name!r} returned {type(method).__name__}, not a CirMethod")
    return method


@register_cir_method("combiner")
def _combiner(*, inputs: MethodInputs) -> CirMethod:
    if inputs.checkpoint is None:
        raise ConfigError(
            "--method combiner needs --checkpoint (a combiner model folder, checkpoint or run folder)"
        )
    model = load(inputs.checkpoint, kind="combiner", device=inputs.device)
    record = to_dict(model.config.model.clip)
    return FuserMethod(
        model.clip, fuser=model.fuser, checkpoint=model.folder, stage=model.stage, clip_record=record
    )


def _baseline_factory(cls: type[CirMethod]) -> Callable[..., CirMethod]:
    def factory(*, inputs: MethodInputs) -> CirMethod:
        spec = inputs.require_clip(cls.name)
        return cls(spec.load(device=inputs.device), clip_record=spec.record())

    return factory


for _cls in (ImageOnly, TextOnly, Sum):
    register_cir_method(_cls.name)(_baseline_factory(_cls))


class CirevlMethod(CirMethod):
    """CIReVL: the CLIP text feature of an LLM-edited description of the reference image (training-free)."""

    name = "cirevl"

    def __init__(
        self,
        clip: ClipBundle,
        *,
        captioner: CaptionerSpec,
        options: CirevlOptions,
        clip_record: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(clip, clip_record=clip_record)
        self.captioner = captioner
        self.options = options
        self.reports: dict[str, CirevlReport] = {}

    def _backend(self) -> Any:
        from captioning.backends import create_backend

        return create_backend(self.captioner.backend, **self.captioner.options)

    def query_features(
        self, queries: CirQuerySet, *, images: CachedFeatures, options: FeatureOptions
    ) -> torch.Tensor:
        edited, report = edited_descriptions(
            dataset=queries.dataset,
            references=queries.references,
            modifications=queries.captions,
            load_image=queries.load_image,
            backend_name=self.captioner.backend,
            make_backend=self._backend,
            options=self.options,
        )
        self.reports[queries.dataset] = report
        return F.normalize(_texts(self.clip, edited, options).float(), dim=-1)

    def describe(self) -> dict[str, Any]:
        from capret.inference.cir.cirevl import DESCRIBE_VERSION, EDIT_VERSION

        return {
            **super().describe(),
            "captioner": self.captioner.backend,
            "captioner_options": {k: v for k, v in self.captioner.options.items() if "key" not in k},
            "store": str(self.options.store),
            "prompts": [DESCRIBE_VERSION, EDIT_VERSION],
            "prompt_file": str(self.options.prompt_file) if self.options.prompt_file else None,
            "on_missing": self.options.on_missing,
            "max_tokens": {
                "caption": self.options.max_caption_tokens,
                "rewrite": self.options.max_edit_tokens,
            },
        }

    def report(self) -> dict[str, Any]:
        """Per unit and summed counts; ``model_calls`` is 0 when everything came from the store."""
        units = {name: r.to_dict() for name, r in self.reports.items()}
        total = {
            key: sum(int(u[key]) for u in units.values())
            for key in (
                "queries",
                "fallbacks",
                "unparsed",
                "missing",
                "empty_descriptions",
                "model_calls",
                "captions_new",
                "rewrites_new",
            )
        }
        return {"total": total, "units": units}


@register_cir_method("cirevl")
def _cirevl(*, inputs: MethodInputs) -> CirMethod:
    backend = inputs.captioner.backend
    store = inputs.caption_store or inputs.work_dir / f"cirevl_{backend}.jsonl"
    options = CirevlOptions(
        store=Path(store),
        batch_size=inputs.caption_batch_size,
        progress=inputs.progress,
        **inputs.cirevl_settings,
    )
    spec = inputs.require_clip("cirevl")
    return CirevlMethod(
        spec.load(device=inputs.device),
        captioner=inputs.captioner,
        options=options,
        clip_record=spec.record(),
    )


def baseline(name: str, method: CirMethod) -> CirMethod:
    """A shortcut baseline on the CLIP of ``method`` (the evaluated method's own)."""
    classes: dict[str, type[CirMethod]] = {"image-only": ImageOnly, "text-only": TextOnly, "sum": Sum}
    return classes[name](method.clip, clip_record=method.clip_record)


def search_methods(
    methods: dict[str, CirMethod],
    queries: CirQuerySet,
    *,
    gallery: Sequence[str],
    k: int = TOP_K,
    exclude_reference: bool = False,
    options: FeatureOptions | None = None,
) -> dict[str, CIRRanking]:
    """Global top-``k`` ranking of ``gallery`` per query for every method (all on one CLIP).

    The images of gallery and references are encoded once (through the feature cache when
    ``options.cache_dir`` is set) and shared by all methods, so the baselines cost one text pass. With
    ``exclude_reference`` a query's own reference never appears in its ranking (CIRR protocol).
    """
    opts = options or FeatureOptions()
    clips = {id(m.clip) for m in methods.values()}
    if len(clips) != 1:
        raise ValueError("search_methods ranks methods that share one CLIP; got several")
    clip = next(iter(methods.values())).clip
    names = list(dict.fromkeys([*gallery, *queries.references]))
    images = image_features(
        clip,
        names,
        load_image=queries.load_image,
        cache_dir=opts.cache_dir,
        fingerprint=opts.image_fingerprint,
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
    )
    gallery_feats = CachedFeatures(list(gallery), F.normalize(images.lookup(list(gallery)).float(), dim=-1))
    out: dict[str, CIRRanking] = {}
    for name, method in methods.items():
        query = method.query_features(queries, images=images, options=opts).float().cpu()
        if query.shape != (len(queries.references), gallery_feats.features.shape[1]):
            raise ValueError(
                f"method {name!r} returned query features {tuple(query.shape)}, expected "
                f"[{len(queries.references)}, {gallery_feats.features.shape[1]}]"
            )
        ranked = rank_gallery(
            query,
            gallery_feats.features,
            gallery_feats.names,
            top_n=k,
            exclude=list(queries.references) if exclude_reference else None,
        )
        out[name] = CIRRanking(names=ranked, queries=query, gallery=gallery_feats)
    return out
