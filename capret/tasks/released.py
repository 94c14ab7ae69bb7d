"""Model folders from the papers' released checkpoints: ``capret convert-checkpoint --from ...``.

:mod:`capret.models.convert` renames a released file onto capret's modules; this module loads the ``--clip``
backbone the checkpoint belongs to, checks that the two fit (token width, feature size, the CLIP weights the
file carries), and writes the self-describing model folder the matching ``capret-train`` task exports
(:mod:`capret.models.folder`: ``capret_model.json`` naming its ``kind``), so ``capret-eval cir --method ...``
(``--mapper`` or ``--checkpoint``) and :func:`capret.load` open it like one trained here:

* ``searle`` / ``lincir`` -> a ``phi`` / ``lincir`` folder (:class:`~capret.models.zeroshot.Phi`);
* ``pic2word`` -> a ``pic2word`` folder (:class:`~capret.models.zeroshot.Pic2WordMapper`);
* ``clip4cir`` -> a stage-2 ``combiner`` folder holding the Combiner and, with ``--clip-checkpoint``, the
  fine-tuned CLIP beside it.

A CLIP carried by the checkpoint (OpenAI's layout) is mapped onto the backbone — open_clip keeps OpenAI's names,
a Hugging Face ViT CLIP gets them through :func:`~capret.models.convert.openai_to_hf_clip` — and compared with it. Pic2Word saves its *frozen*
CLIP: it must equal ``--clip`` up to the rounding of a half-precision save (nothing more is stored), and a
mismatch is an error naming the largest difference, because a mapper is only valid on the backbone it was
trained on. CLIP4Cir's fine-tuned CLIP differs by design and is written into the folder. Each method's
preprocessing is the paper's: SEARLE and CLIP4Cir target-pad (1.25), Pic2Word and LinCIR use CLIP's own
resize + centre crop. The folder records where it came from (``trained_from.converted_from``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from capret.config import to_dict
from capret.errors import CheckpointError
from capret.inference.cir.combiner import save_combiner_folder
from capret.inference.cir.inversion import save_mapper_folder
from capret.models.clip import ClipBundle, TaskClipConfig, load_task_clip_config
from capret.models.combiner import Combiner, CombinerModelConfig, CombinerNetConfig, CombinerRecord
from capret.models.convert import MappedCheckpoint, get_converter, map_openai_clip, openai_to_hf_clip
from capret.models.zeroshot import MapperRecord, build_mapper

__all__ = ["ConversionReport", "convert_released_checkpoint", "paper_preprocess"]

#: each paper's evaluation preprocessing in front of CLIP's own transform
_PREPROCESS = {"searle": "targetpad", "lincir": "none", "pic2word": "none", "clip4cir": "targetpad"}
#: largest |difference| (relative to the tensor's scale) still "the same weights": a half-precision save rounds
#: to 2^-11 relative
_SAME_WEIGHTS = 2.0**-10


def paper_preprocess(source: str) -> str:
    """The padding each paper evaluates with (``targetpad`` or ``none`` = CLIP's resize + centre crop)."""
    return _PREPROCESS[source]


@dataclass
class ConversionReport:
    """What a conversion read, mapped, dropped and wrote (printed as JSON by the CLI)."""

    source: str
    checkpoint: str
    out: str
    kind: str
    method: str
    clip: dict[str, Any]
    hparams: dict[str, Any]
    mapped: dict[str, str]
    dropped: dict[str, str]
    clip_weights: str
    clip_max_abs_diff: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    folders: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Target:
    """What every folder writer takes: the renamed checkpoint, the ``--clip`` backbone it was checked against with
    its task section, the checkpoint's own CLIP weights where they differ from the backbone, the folder to write
    and the report to fill (one value, so the writers cannot be handed them in another order)."""

    mapped: MappedCheckpoint
    bundle: ClipBundle
    section: TaskClipConfig
    clip_state: dict[str, Tensor] | None
    out: Path
    report: ConversionReport


def _default_pretrained(backend: str, name: str, pretrained: str | None) -> str | None:
    """open_clip architectures without a tag would be *random*: the papers' backbones are OpenAI's weights."""
    if backend == "open_clip" and pretrained is None and ":" not in name:
        return "openai"
    return pretrained


def _compare_clip(mapped: dict[str, Tensor], clip: ClipBundle) -> float:
    """Largest |checkpoint - backbone| over the CLIP tensors, relative to each tensor's largest magnitude."""
    current = clip.state_dict()
    worst = 0.0
    for key, value in mapped.items():
        base = current[key].detach().float().cpu()
        if not value.is_floating_point():
            worst = max(worst, float((value.cpu() != current[key].cpu()).any()))
            continue
        scale = float(base.abs().max()) or 1.0
        worst = max(worst, float((value.float().cpu() - base).abs().max()) / scale)
    return worst


def _clip_section(backend: str, name: str, pretrained: str | None, preprocess: str) -> TaskClipConfig:
    return TaskClipConfig(backend=backend, name=name, pretrained=pretrained, preprocess=preprocess)  # type: ignore[arg-type]


def convert_released_checkpoint(
    source: str,
    *,
    checkpoint: str | Path,
    clip: str,
    out: str | Path,
    clip_backend: str | None = None,
    clip_pretrained: str | None = None,
    clip_checkpoint: str | Path | None = None,
    preprocess: str | None = None,
    device: str | torch.device = "cpu",
) -> ConversionReport:
    """Convert a released checkpoint of ``source`` (searle, pic2word, lincir, clip4cir) into a capret folder.

    Args:
        checkpoint: the released file (CLIP4Cir: the Combiner file).
        clip: the backbone: an open_clip architecture (``ViT-L-14``, ``RN50x4``, ``local-dir:/path``) or a
            Hugging Face hub id / local folder.
        out: the folder to write (replaced if it exists).
        clip_backend: ``open_clip`` or ``hf``; default: the family the source project runs.
        clip_pretrained: open_clip pretrained tag or weights file; default ``openai`` for a bare architecture.
        clip_checkpoint: CLIP4Cir's fine-tuned CLIP file (``{"CLIP": ...}``).
        preprocess: override the paper's preprocessing (``targetpad`` | ``squarepad`` | ``none``).

    Raises:
        CheckpointError: a refused or unreadable file, keys that match nothing, or a backbone of another size.
    """
    spec = get_converter(source)
    checkpoint, out = Path(checkpoint), Path(out)
    extra = Path(clip_checkpoint) if clip_checkpoint is not None else None
    mapped = spec.convert(checkpoint, extra=extra)
    backend = clip_backend or spec.backend
    pretrained = _default_pretrained(backend, clip, clip_pretrained)
    section = _clip_section(backend, clip, pretrained, preprocess or paper_preprocess(source))
    bundle = load_task_clip_config(section, device=device)
    report = ConversionReport(
        source=source,
        checkpoint=str(checkpoint),
        out=str(out),
        kind=spec.kind,
        method=spec.method,
        clip=to_dict(section),
        hparams=dict(mapped.hparams),
        mapped=dict(mapped.mapped),
        dropped=dict(mapped.dropped),
        clip_weights="none in the checkpoint: the backbone's own weights are used",
        metadata=dict(mapped.metadata),
    )
    clip_state = _clip_weights(mapped, bundle, report=report, backend=backend, path=extra or checkpoint)
    target = _Target(
        mapped=mapped, bundle=bundle, section=section, clip_state=clip_state, out=out, report=report
    )
    if spec.kind == "combiner":
        _write_combiner(target)
    else:
        _write_mapper(target, source=source, spec=spec)
    report.folders = [str(out)]
    return report


def _clip_weights(
    mapped: MappedCheckpoint, bundle: ClipBundle, *, report: ConversionReport, backend: str, path: Path
) -> dict[str, Tensor] | None:
    """The checkpoint's CLIP in the bundle's names if it differs from the backbone, else None (recorded)."""
    if mapped.clip_state is None:
        return None
    source = mapped.clip_state
    if backend == "hf":  # the same weights under transformers' names (ViT towers)
        source = openai_to_hf_clip(source, path=path)
    state, dropped = map_openai_clip(source, bundle.state_dict(), path=path)
    report.dropped.update({f"clip.{k}": v for k, v in dropped.items()})
    report.mapped.update({f"clip.{k[len('model.') :]}": k for k in state})
    diff = _compare_clip(state, bundle)
    report.clip_max_abs_diff = diff
    if diff <= _SAME_WEIGHTS:
        report.clip_weights = (
            f"equal to the backbone {bundle.name} (max relative |diff| {diff:.2e}); not stored"
        )
        return None
    report.clip_weights = f"differ from the backbone {bundle.name} (max relative |diff| {diff:.2e}); stored"
    return state


def _check_sizes(bundle: ClipBundle, *, input_dim: int, output_dim: int | None, path: Path) -> None:
    problems = []
    if input_dim != bundle.feature_dim:
        problems.append(f"input {input_dim} but {bundle.name} features are {bundle.feature_dim}-wide")
    if output_dim is not None and output_dim != bundle.token_width:
        problems.append(f"output {output_dim} but {bundle.name} tokens are {bundle.token_width}-wide")
    if problems:
        raise CheckpointError(
            f"{path}: the checkpoint is for another CLIP than --clip: {'; '.join(problems)}", path=path
        )


def _write_mapper(target: _Target, *, source: str, spec: Any) -> None:
    hp, bundle, report = target.mapped.hparams, target.bundle, target.report
    _check_sizes(bundle, input_dim=hp["input_dim"], output_dim=hp["output_dim"], path=Path(report.checkpoint))
    bundle.placeholder_id(spec.placeholder)  # one token of this tokenizer, or a clear error now
    family = "pic2word" if source == "pic2word" else "phi"
    mapper = build_mapper(family, dict(hp))
    mapper.load_state_dict(target.mapped.state, strict=True)
    if target.clip_state is not None:
        raise CheckpointError(
            f"{report.checkpoint}: its CLIP is not the backbone {bundle.name} ({report.clip_weights}); the mapper was "
            "trained on the CLIP saved with it — pass that backbone as --clip / --clip-pretrained",
            path=Path(report.checkpoint),
        )
    record = MapperRecord(
        clip=target.section, method=spec.method, mapper=family, hparams=dict(hp), placeholder=spec.placeholder
    )
    save_mapper_folder(
        target.out, kind=spec.kind, mapper=mapper, record=record, trained_from=_provenance(report)
    )


def _write_combiner(target: _Target) -> None:
    hp, bundle, clip_state = target.mapped.hparams, target.bundle, target.clip_state
    _check_sizes(bundle, input_dim=hp["feature_dim"], output_dim=None, path=Path(target.report.checkpoint))
    combiner = Combiner(
        hp["feature_dim"],
        projection_dim=hp["projection_dim"],
        hidden_dim=hp["hidden_dim"],
        dropout=hp["dropout"],
    )
    combiner.load_state_dict(target.mapped.state, strict=True)
    net = CombinerNetConfig(
        projection_dim=hp["projection_dim"], hidden_dim=hp["hidden_dim"], dropout=hp["dropout"]
    )
    record = CombinerRecord(stage=2, model=CombinerModelConfig(clip=target.section, combiner=net))
    if clip_state is not None:
        bundle.load_state_dict({**bundle.state_dict(), **clip_state}, strict=True)
    save_combiner_folder(
        target.out,
        clip=bundle,
        fuser=combiner,
        config=record,
        clip_trained=clip_state is not None,
        trained_from=_provenance(target.report),
    )


def _provenance(report: ConversionReport) -> dict[str, Any]:
    """What the folder records about its origin (the report without the long key lists)."""
    data = {k: v for k, v in report.to_json().items() if k not in ("mapped", "dropped", "folders")}
    data["dropped"] = sorted(report.dropped)
    return {"converted_from": data}
