"""What every released-checkpoint converter shares: a pickle-free reader and the record of what was mapped."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capret.errors import CheckpointError

__all__ = [
    "BOOKKEEPING",
    "MAPPER_SIZES",
    "MappedCheckpoint",
    "SizeSources",
    "check_complete",
    "check_module_state",
    "entry_checkpoint",
    "map_module_state",
    "map_openai_clip",
    "openai_to_hf_clip",
    "read_tensor_file",
    "rename_by_rules",
    "strip_prefix",
    "tensor_entry",
    "unused_entries",
]


@dataclass
class MappedCheckpoint:
    """A released checkpoint renamed onto capret's module.

    Attributes:
        state: the module's state dict (capret names).
        hparams: the module sizes the tensors imply (``input_dim``, ``hidden_dim``, ...).
        mapped: ``source key -> capret key`` for every tensor that went into ``state``.
        dropped: ``source key -> reason`` for every entry deliberately not loaded (an optimizer state, a
            training epoch, a frozen CLIP that is compared separately).
        clip_state: an OpenAI-layout CLIP state dict carried by the checkpoint (Pic2Word's frozen CLIP,
            CLIP4Cir's fine-tuned one), or None.
        metadata: small non-tensor facts worth recording (epoch, run name).
    """

    state: dict[str, Tensor]
    hparams: dict[str, Any]
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    clip_state: dict[str, Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def read_tensor_file(path: str | Path) -> Any:
    """The content of a released checkpoint: a safetensors file, or a torch file read with ``weights_only=True``.

    ``weights_only`` lets through dicts, lists, numbers, strings and tensors only, so a file whose pickle would
    build any other object (and could run code while doing so) is refused *before* anything in it runs.

    Raises:
        CheckpointError: the file is missing, or is not loadable without executing code (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist", path=path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # an UnpicklingError for code-carrying pickles; anything else for non-torch files
        raise CheckpointError(
            f"{path}: refused — not loadable with torch.load(weights_only=True), so it was not executed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); a file that "
            "carries Python objects beyond tensors cannot be converted",
            path=path,
        ) from exc


def _without(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """``state`` with ``prefix`` removed from every key that has it (DDP-wrapped saves)."""
    return {_without(k, prefix): v for k, v in state.items()}


def tensor_entry(payload: Any, key: str, *, path: str | Path, what: str) -> dict[str, Tensor]:
    """``payload[key]`` as a ``{name: tensor}`` dict, or an error naming the file and the entries it has."""
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path}: expected a dict with {key!r}, found a {type(payload).__name__}", path=path
        )
    entry = payload.get(key)
    if not isinstance(entry, dict) or not all(isinstance(v, Tensor) for v in entry.values()):
        raise CheckpointError(
            f"{path}: no {what} state dict under {key!r} (entries: {sorted(map(str, payload))})", path=path
        )
    return dict(entry)


def rename_by_rules(
    state: Mapping[str, Tensor], rules: tuple[tuple[re.Pattern[str], str], ...]
) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Rename every key by the first ``(pattern, template)`` rule that matches it whole.

    Returns ``(renamed state, {source key: our key}, source keys no rule matched)`` — the unmatched ones go to
    :func:`check_complete`, so a release with extra entries is refused with all of them listed.
    """
    out: dict[str, Tensor] = {}
    mapping: dict[str, str] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        for pattern, template in rules:
            match = pattern.fullmatch(key)
            if match:
                out[match.expand(template)] = value
                mapping[key] = match.expand(template)
                break
        else:
            unmatched.append(key)
    return out, mapping, unmatched


def check_complete(
    *, path: str | Path, unmatched: list[str], missing: list[str], shapes: list[str], what: str
) -> None:
    """Raise one :class:`CheckpointError` listing every unmatched key, missing key and shape mismatch."""
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} checkpoint keys match nothing: {sorted(unmatched)}")
    if missing:
        problems.append(f"{len(missing)} {what} keys are not in the checkpoint: {sorted(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {shapes}")
    if problems:
        raise CheckpointError(f"{path}: cannot convert to {what}; " + "; ".join(problems), path=path)


#: a size argument of the target module -> the tensor (capret name) and the dimension it is read from
SizeSources = Mapping[str, tuple[str, int]]


def check_module_state(
    state: Mapping[str, Tensor],
    *,
    path: str | Path,
    unmatched: Sequence[str] = (),
    sizes: SizeSources,
    build: Callable[..., nn.Module],
    what: str,
) -> dict[str, int]:
    """Check a renamed state dict against the module it is for and return the sizes it implies.

    The expected keys and shapes are those of ``build(**sizes)`` itself (built on the meta device, so no memory
    is spent), not a table restating the architecture, so the check cannot drift from the module. All problems
    are listed at once — source keys no rule took (``unmatched``), keys the module does not have, module keys the
    checkpoint lacks, tensors whose shape disagrees with the sizes read off the others — so a wrong release is
    refused with everything that is wrong with it.

    Args:
        sizes: where each size argument of ``build`` is read (``{"hidden_dim": ("layers.0.weight", 0)}``).
        build: the module's constructor, called with the sizes as keyword arguments.

    Raises:
        CheckpointError: any unmatched key, missing key or shape mismatch (naming the file and ``what``).
    """
    with torch.device("meta"):
        needed = list(build(**dict.fromkeys(sizes, 1)).state_dict())
    unmatched = [*unmatched, *(k for k in state if k not in needed)]
    missing = [k for k in needed if k not in state]
    found: dict[str, int] = {}
    mismatches: list[str] = []
    if not missing:
        mismatches = [
            f"{key}: {tuple(state[key].shape)} has no dimension {dim} ({name})"
            for name, (key, dim) in sizes.items()
            if state[key].dim() <= dim
        ]
    if not missing and not mismatches:
        found = {name: int(state[key].shape[dim]) for name, (key, dim) in sizes.items()}
        with torch.device("meta"):
            expected = build(**found).state_dict()
        mismatches = [
            f"{k}: {tuple(state[k].shape)} but {what} needs {tuple(v.shape)}"
            for k, v in expected.items()
            if state[k].shape != v.shape
        ]
    check_complete(path=path, unmatched=unmatched, missing=missing, shapes=mismatches, what=what)
    return found


def map_module_state(
    state: Mapping[str, Tensor],
    rules: tuple[tuple[re.Pattern[str], str], ...],
    *,
    path: str | Path,
    sizes: SizeSources,
    build: Callable[..., nn.Module],
    what: str,
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, int]]:
    """A released module's state dict renamed by ``rules`` (:func:`rename_by_rules`) and checked against
    ``build`` (:func:`check_module_state`, which also refuses the keys no rule took).

    Returns ``(state in capret's names, {source key: our key}, the sizes the tensors imply)``.
    """
    out, mapping, unmatched = rename_by_rules(state, rules)
    found = check_module_state(out, path=path, unmatched=unmatched, sizes=sizes, build=build, what=what)
    return out, mapping, found


#: why an entry of a release beside its weights (an epoch, a run name) is not loaded
BOOKKEEPING = "training bookkeeping, not a weight"

#: ``map_state(state, path=...) -> (state in capret's names, {source key: our key}, sizes)``, e.g. a
#: :func:`map_module_state` with a release's rules
MapState = Callable[..., tuple[dict[str, Tensor], dict[str, str], dict[str, int]]]


def entry_checkpoint(
    payload: Any,
    key: str,
    *,
    path: Path,
    map_state: MapState,
    hparams: Mapping[str, Any],
    what: str,
    also_used: Collection[str] = (),
) -> MappedCheckpoint:
    """The module a release keeps under ``payload[key]`` (DDP's ``module.`` prefixes stripped), renamed and
    checked by ``map_state``, as a :class:`MappedCheckpoint` whose hyper-parameters are the sizes it implies plus
    ``hparams``.

    ``mapped`` names the release's own keys (``<key>.<name as saved>``); every other entry of ``payload`` except
    ``also_used`` is recorded as dropped, its scalars as metadata. A release that also carries a CLIP sets
    ``clip_state`` on the result.

    Raises:
        CheckpointError: ``payload[key]`` is not a state dict, or ``map_state`` refuses it.
    """
    raw = tensor_entry(payload, key, path=path, what=what)
    state, mapping, sizes = map_state(strip_prefix(raw), path=path)
    saved_as = {_without(k, "module."): k for k in raw}
    dropped, metadata = unused_entries(payload, used=(key, *also_used), reason=BOOKKEEPING)
    return MappedCheckpoint(
        state=state,
        hparams={**sizes, **hparams},
        mapped={f"{key}.{saved_as[k]}": v for k, v in mapping.items()},
        dropped=dropped,
        metadata=metadata,
    )


#: where the sizes of a :class:`~capret.models.zeroshot.Phi` or a :class:`~capret.models.zeroshot.Pic2WordMapper`
#: (the same three Linears at ``layers`` 0, 3 and 6) are read
MAPPER_SIZES: SizeSources = {
    "input_dim": ("layers.0.weight", 1),
    "hidden_dim": ("layers.0.weight", 0),
    "output_dim": ("layers.6.weight", 0),
}


def unused_entries(
    payload: Mapping[Any, Any], *, used: Collection[str], reason: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """The entries of a release outside ``used``, each with why it is not loaded (an ``optimizer`` is named as
    such, anything else gets ``reason``), and the scalar ones among them as metadata worth recording."""
    dropped: dict[str, str] = {}
    metadata: dict[str, Any] = {}
    for key, value in payload.items():
        if key in used:
            continue
        if isinstance(value, int | float | str):
            metadata[str(key)] = value
        dropped[str(key)] = "optimizer state" if key == "optimizer" else reason
    return dropped, metadata


#: entries of an OpenAI ``clip.load(jit=True)`` state dict that are architecture facts, not weights
_OPENAI_META = re.compile(r"(input_resolution|context_length|vocab_size)")


def map_openai_clip(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], *, path: str | Path, prefix: str = "model."
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """An OpenAI-layout CLIP state dict (``visual.*``, ``transformer.resblocks.*``, ``token_embedding``, ...) on an
    open_clip model wrapped in a :class:`~capret.models.clip_base.ClipBundle` (whose keys are ``prefix`` + the
    open_clip names, which open_clip keeps identical to OpenAI's for both the ViT and the ModifiedResNet towers).

    Returns ``(state dict in the bundle's names, dropped entries with reasons)``.

    Raises:
        CheckpointError: listing every key with no counterpart, every bundle weight the checkpoint lacks and
            every shape mismatch (a checkpoint of another architecture than ``--clip``).
    """
    out: dict[str, Tensor] = {}
    dropped: dict[str, str] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        if _OPENAI_META.fullmatch(key):
            dropped[key] = "architecture fact of a JIT export, not a weight"
            continue
        name = prefix + key
        if name in target:
            out[name] = value
        else:
            unmatched.append(key)
    missing = [
        k[len(prefix) :] for k in target if k not in out and not k.endswith(("attn_mask", "position_ids"))
    ]
    shapes = [
        f"{k[len(prefix) :]}: checkpoint {tuple(v.shape)} vs backbone {tuple(target[k].shape)}"
        for k, v in out.items()
        if v.shape != target[k].shape
    ]
    check_complete(path=path, unmatched=unmatched, missing=missing, shapes=shapes, what="the --clip backbone")
    return out, dropped


#: OpenAI CLIP -> Hugging Face ``CLIPModel`` names outside the transformer blocks (ViT towers only)
_HF_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
#: inside a residual block: OpenAI -> Hugging Face (the fused attention input projection is split below)
_HF_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_IN_PROJ = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def openai_to_hf_clip(state: Mapping[str, Tensor], *, path: str | Path) -> dict[str, Tensor]:
    """An OpenAI-layout CLIP state dict (ViT towers) in Hugging Face ``CLIPModel``'s names.

    The facts of transformers' own OpenAI converter: the fused ``in_proj`` of each attention is split into
    ``q_proj``, ``k_proj``, ``v_proj`` (in that order); ``text_projection`` and ``visual.proj`` are stored
    ``[width, embed]`` and applied as ``x @ P``, where transformers keeps ``Linear`` weights ``[embed, width]``,
    so they are transposed. Entries with no counterpart (a ModifiedResNet tower, JIT architecture facts) are
    left out here and reported by the caller's completeness check.

    Raises:
        CheckpointError: a ModifiedResNet image tower (``visual.layer1...``), which transformers has no class for.
    """
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state):
        raise CheckpointError(
            f"{path}: a ModifiedResNet (RN50x4-style) CLIP has no Hugging Face counterpart; pass --clip-backend "
            "open_clip",
            path=path,
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        tower = "vision_model" if key.startswith("visual.") else "text_model"
        if key in _HF_NAMES:
            out[_HF_NAMES[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.T.contiguous()
        elif match := _IN_PROJ.fullmatch(key):
            layer, kind = match[2], match[3]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{tower}.encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.contiguous()
        elif (match := _BLOCK.fullmatch(key)) and match[3] in _HF_BLOCK:
            out[f"{tower}.encoder.layers.{match[2]}.{_HF_BLOCK[match[3]]}.{match[4]}"] = value
        else:
            out[key] = value  # no counterpart: the completeness check names it
    return out
