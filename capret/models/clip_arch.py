"""Small open_clip architectures described as data, and the CLIP folder that task ``clip`` exports.

No pretrained CLIP can be downloaded here, so the package trains its own on the garment world
(``capret-train`` task ``clip``). The architecture is a config section (:class:`ClipArchConfig`) turned into
open_clip's own ``model_cfg`` dict and built by open_clip's ``CLIP`` class, so the trained model is an ordinary
open_clip model: the exported folder is open_clip's ``local-dir:`` layout (``open_clip_config.json`` +
``open_clip_model.safetensors``), which :func:`capret.models.clip.load_clip` (``backend="open_clip"``) and
``open_clip.create_model_and_transforms("local-dir:...")`` both read, plus our sidecar ``capret_model.json``
(``kind: clip``, the architecture as the model ``config``, the training config, metrics and provenance; the
folder contract of :mod:`capret.models.folder`, so ``capret.load(folder)`` opens it).

The text tower keeps CLIP's BPE vocabulary (49,408 ids) so open_clip's bundled tokenizer works unchanged; the
context may be shorter than 77 because alt-text descriptions of a garment are short.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from capret.config import cfg, to_dict
from capret.errors import CheckpointError, ConfigError
from capret.io import atomic_write, atomic_write_json, read_json
from capret.models.clip import CLIP_MEAN, CLIP_STD
from capret.models.folder import MODEL_CONFIG_FILE, write_model_config
from capret.models.openclip import OPEN_CLIP_CONFIG_FILE, OpenClipBundle, load_open_clip, wrap_open_clip

__all__ = [
    "CLIP_FORMAT",
    "CLIP_KIND",
    "CLIP_SIDECAR_FILE",
    "CLIP_WEIGHTS_FILE",
    "ClipArchConfig",
    "TextTowerConfig",
    "VisionTowerConfig",
    "build_open_clip",
    "is_clip_folder",
    "load_clip_folder",
    "open_clip_model_cfg",
    "read_clip_sidecar",
    "wrap_in_memory",
    "write_clip_folder",
]

CLIP_KIND = "clip"
CLIP_FORMAT = "capret.clip/1"
CLIP_SIDECAR_FILE = MODEL_CONFIG_FILE
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
#: CLIP's byte-pair vocabulary size (open_clip's bundled SimpleTokenizer emits ids below it)
BPE_VOCAB_SIZE = 49408


@dataclass
class VisionTowerConfig:
    """The image tower: a ViT (patches -> transformer) or open_clip's ModifiedResNet (CLIP's RN family)."""

    kind: Literal["vit", "resnet"] = cfg("vit", "vit | resnet (ModifiedResNet with attention pooling)")
    image_size: int = cfg(64, "input resolution in pixels (the exported preprocessing resizes to it)")
    width: int = cfg(128, "vit: transformer width; resnet: width of the stem (stage widths are 1x..8x it x4)")
    layers: int = cfg(3, "vit: transformer blocks; resnet: blocks in each of the 4 stages")
    head_width: int = cfg(32, "width of one attention head (heads = width // head_width)")
    patch_size: int = cfg(16, "vit: patch size in pixels (image_size must be a multiple of it)")


@dataclass
class TextTowerConfig:
    """The text tower: a causal transformer pooled at the end-of-text token, as in CLIP."""

    context_length: int = cfg(32, "tokens per text (start/end included; longer texts are cut); <= 77")
    width: int = cfg(128, "transformer width")
    heads: int = cfg(4, "attention heads")
    layers: int = cfg(2, "transformer blocks")


@dataclass
class ClipArchConfig:
    """A small open_clip architecture (``model.arch`` of task ``clip``)."""

    embed_dim: int = cfg(128, "size of the joint image-text embedding")
    vision: VisionTowerConfig = cfg(factory=VisionTowerConfig, help="image tower")
    text: TextTowerConfig = cfg(factory=TextTowerConfig, help="text tower")


def open_clip_model_cfg(arch: ClipArchConfig) -> dict[str, Any]:
    """open_clip's ``model_cfg`` dict (the schema of its ``model_configs/*.json``) for ``arch``."""
    v, t = arch.vision, arch.text
    if v.kind not in ("vit", "resnet"):
        raise ConfigError(f"model.arch.vision.kind={v.kind!r}; valid: vit, resnet")
    if v.kind == "vit" and v.image_size % v.patch_size:
        raise ConfigError(
            f"model.arch.vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}"
        )
    if v.width % v.head_width:
        raise ConfigError(f"model.arch.vision.width={v.width} is not a multiple of head_width={v.head_width}")
    if not 2 <= t.context_length <= 77:
        raise ConfigError(f"model.arch.text.context_length={t.context_length}; valid: 2..77")
    if t.width % t.heads:
        raise ConfigError(f"model.arch.text.width={t.width} is not a multiple of heads={t.heads}")
    vision: dict[str, Any] = {
        "image_size": v.image_size,
        "layers": v.layers if v.kind == "vit" else [v.layers] * 4,
        "width": v.width,
        "head_width": v.head_width,
        "patch_size": v.patch_size if v.kind == "vit" else None,
    }
    text = {
        "context_length": t.context_length,
        "vocab_size": BPE_VOCAB_SIZE,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
    }
    return {"embed_dim": arch.embed_dim, "vision_cfg": vision, "text_cfg": text}


def preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg`` of an exported folder: CLIP's statistics at the tower's resolution."""
    return {
        "size": int(model_cfg["vision_cfg"]["image_size"]),
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def build_open_clip(arch: ClipArchConfig, *, seed: int | None = None) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` of ``arch`` (seeded when ``seed`` is given)."""
    import open_clip

    model_cfg = open_clip_model_cfg(arch)
    if seed is not None:
        torch.manual_seed(seed)
    return open_clip.model.CLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"])


def wrap_in_memory(
    model: nn.Module, arch: ClipArchConfig, *, preprocess: str = "targetpad", name: str = "capret-clip"
) -> OpenClipBundle:
    """``model`` (built by :func:`build_open_clip`) as an :class:`OpenClipBundle` with the preprocessing and
    tokenizer its exported folder will have (the same ``preprocess_id`` too)."""
    import open_clip

    pre = preprocess_cfg(open_clip_model_cfg(arch))
    own = open_clip.image_transform(
        pre["size"],
        is_train=False,
        mean=pre["mean"],  # lists, as open_clip reads them back from the folder's JSON (same preprocess_id)
        std=pre["std"],
        resize_mode=pre["resize_mode"],
        interpolation=pre["interpolation"],
    )
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=arch.text.context_length)
    return wrap_open_clip(model, tokenizer=tokenizer, own_transform=own, name=name, preprocess=preprocess)


def write_clip_folder(
    directory: str | Path,
    *,
    model: nn.Module,
    arch: ClipArchConfig,
    sidecar: dict[str, Any],
) -> Path:
    """Export ``model`` as open_clip's ``local-dir:`` layout plus ``capret_model.json`` (``kind: clip``).

    Args:
        directory: the folder to write (created; files are replaced atomically).
        model: the open_clip ``CLIP`` (not its bundle) whose weights are written.
        arch: its architecture (written as open_clip's ``model_cfg``).
        sidecar: what else ``capret_model.json`` records beside ``kind``, ``format`` and the model ``config``
            (the architecture): the training config, metrics, provenance.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip_model_cfg(arch)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(
        out / CLIP_WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": CLIP_FORMAT})
    )
    atomic_write_json(
        out / OPEN_CLIP_CONFIG_FILE,
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg)},
        indent=1,
    )
    extra = json.loads(json.dumps(dict(sidecar), default=str))
    write_model_config(
        out,
        kind=CLIP_KIND,
        format=CLIP_FORMAT,
        config={"backend": "open_clip", "arch": to_dict(arch)},
        **extra,
    )
    return out


def is_clip_folder(directory: str | Path) -> bool:
    """Whether ``directory`` holds an exported CLIP (open_clip config + weights + a ``kind: clip`` sidecar)."""
    folder = Path(directory)
    needed = (OPEN_CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE, CLIP_SIDECAR_FILE)
    if not all((folder / name).is_file() for name in needed):
        return False
    try:
        return bool(json.loads((folder / CLIP_SIDECAR_FILE).read_text()).get("kind") == CLIP_KIND)
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_clip_sidecar(directory: str | Path) -> dict[str, Any]:
    """The ``capret_model.json`` of an exported CLIP folder; a missing file or another ``kind`` is an error."""
    folder = Path(directory)
    for name in (OPEN_CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE, CLIP_SIDECAR_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"not an exported CLIP folder: {name} is missing (train one with capret-train task clip)",
                path=folder,
            )
    meta = read_json(folder / CLIP_SIDECAR_FILE, what="CLIP model sidecar")
    if not isinstance(meta, dict) or meta.get("kind") != CLIP_KIND:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise CheckpointError(f"kind={kind!r} in {CLIP_SIDECAR_FILE}; expected {CLIP_KIND!r}", path=folder)
    return meta


def load_clip_folder(
    directory: str | Path, *, preprocess: str = "targetpad", device: str | torch.device = "cpu"
) -> OpenClipBundle:
    """Load an exported CLIP folder through open_clip's own ``local-dir:`` path (checks the sidecar first)."""
    read_clip_sidecar(directory)
    return load_open_clip(str(Path(directory)), pretrained=None, preprocess=preprocess, device=device)
