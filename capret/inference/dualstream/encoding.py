"""Loading a trained dual-stream model and embedding with it: ``capret.load_model(path)`` and what it returns.

``load_model`` accepts a model folder written after training (``<run>/model``: ``model.safetensors`` +
``capret_model.json`` + encoder assets), a training checkpoint folder (``<run>/best``, ``<run>/checkpoints/
step_...``: the model config is read from the checkpoint sidecar), or a run folder (its ``model/``, else
``best/``, else the latest checkpoint). The returned :class:`RetrievalModel` embeds images (paths, PIL images or
tensors) with or without captions into L2-normalised rows, batched, under ``torch.inference_mode``, with image
decoding in DataLoader workers so the CPU decodes while the model runs.

Also here, because the CLIs, the training task, the pipeline and the quickstart share them: :func:`encode_items` (item crops
of a DeepFashion2-layout split) and :func:`evaluate_items` (the ground-truth-box retrieval protocol).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from capret.data.deepfashion2 import Item
from capret.data.imagefile import check_bad_image_policy, decode_image, find_bad_images
from capret.data.items import ItemCollator, ItemDataset, ItemTransform
from capret.errors import BadImageError, CheckpointError, ConfigError, DataError
from capret.inference.model_kinds import load, register_model_kind
from capret.io import default_device, load_safetensors, read_json
from capret.models.dual_stream import DualStreamModel
from capret.models.folder import MODEL_CONFIG_FILE

__all__ = [
    "PRECISIONS",
    "ItemRetrieval",
    "RetrievalModel",
    "encode_items",
    "evaluate_items",
    "item_transform",
    "load_dual_stream_weights",
    "load_model",
    "box_quality",
    "predict_item_boxes",
]

ImageInput = str | Path | Image.Image | Tensor

#: precision name -> autocast dtype (None = plain float32)
_AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the precisions ``encode_images`` accepts (CLI choice lists come from here)
PRECISIONS: tuple[str, ...] = tuple(_AUTOCAST)


def item_transform(model: DualStreamModel, *, augment: bool = False) -> ItemTransform:
    """The preprocessing the model was trained with (its encoder's data config, mode, padding)."""
    dc, mc = model.data_config, model.config
    return ItemTransform(
        image_size=dc.image_size,
        mean=dc.mean,
        std=dc.std,
        mode=mc.mode,
        crop_margin=mc.crop_margin,
        pad=mc.pad,
        augment=augment,
    )


# ------------------------------------------------------------------------------------------------ loading


def _find_model_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The dual-stream ``model`` section of a checkpoint sidecar config (task config at top or under a key)."""
    if isinstance(config.get("model"), dict) and "visual" in config["model"]:
        return config["model"]
    for value in config.values():
        if isinstance(value, dict):
            found = _find_model_config(value)
            if found is not None:
                return found
    return None


def load_dual_stream_weights(model: DualStreamModel, checkpoint: str | Path) -> DualStreamModel:
    """Load the dual-stream weights of a training checkpoint (keys ``model.*``; loss heads are dropped)."""
    from capret.engine.checkpoint import MODEL_FILE, verify_checkpoint

    verify_checkpoint(checkpoint, files=(MODEL_FILE,))
    path = Path(checkpoint) / MODEL_FILE
    state = load_safetensors(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    prefix = "model."
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(own or state, strict=True)
    return model


@register_model_kind("dualstream")
def _load_dual_stream(folder: Path, *, device: str | torch.device | None = None) -> RetrievalModel:
    """A ``dualstream`` model folder, or a dual-stream training checkpoint rebuilt from its sidecar's config."""
    if (folder / MODEL_CONFIG_FILE).is_file():
        model = DualStreamModel.from_pretrained(folder)
    else:
        sidecar = read_json(folder / "checkpoint.json", what="checkpoint sidecar", allow_nonfinite=True)
        model_config = _find_model_config(sidecar.get("config", {}))
        if model_config is None:
            raise CheckpointError(f"{folder / 'checkpoint.json'}: config has no dual-stream `model` section")
        model = DualStreamModel.from_config_dict(model_config)
        load_dual_stream_weights(model, folder)
    return RetrievalModel(model.eval(), device=default_device(device))


def load_model(path: str | Path, *, device: str | torch.device | None = None) -> RetrievalModel:
    """Load a trained dual-stream model for feature extraction (see the module docstring for ``path``):
    :func:`capret.load` with ``kind="dualstream"``."""
    model = load(path, kind="dualstream", device=device)
    assert isinstance(model, RetrievalModel)  # the registered loader above returns one
    return model


# -------------------------------------------------------------------------------------------- the wrapper


class _ImageList(torch.utils.data.Dataset):
    """Decodes and preprocesses one input per index (run in DataLoader workers)."""

    def __init__(
        self,
        images: Sequence[ImageInput],
        transform: ItemTransform,
        boxes: Sequence[Sequence[float] | None] | None = None,
        *,
        skip_bad: bool = False,
    ) -> None:
        self.images, self.transform, self.boxes, self.skip_bad = images, transform, boxes, skip_bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        """``(pixels, "")``, or under ``skip_bad`` ``(black pixels, reason)`` for an undecodable file."""
        image = self.images[index]
        if isinstance(image, str | Path):
            try:
                image = decode_image(image)
            except BadImageError as exc:
                if not self.skip_bad:
                    raise
                return self.transform(Image.new("RGB", (8, 8)))[0], str(exc) or "unreadable image"
        elif isinstance(image, Tensor):
            image = _tensor_to_pil(image, index=index)
        elif not isinstance(image, Image.Image):
            raise TypeError(
                f"input {index}: expected a path, PIL image or tensor, got {type(image).__name__}"
            )
        box = self.boxes[index] if self.boxes is not None else None
        return self.transform(image, box)[0], ""


def _tensor_to_pil(tensor: Tensor, *, index: int) -> Image.Image:
    """A ``[3, H, W]`` image tensor (uint8 0..255 or float 0..1) as a PIL image."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(
            f"input {index}: image tensors must be [3, H, W] (or [1, H, W]); got {tuple(tensor.shape)}"
        )
    data = tensor.detach().cpu()
    if data.dtype != torch.uint8:
        data = (data.float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = data.expand(3, -1, -1).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


class RetrievalModel:
    """A trained dual-stream model with its preprocessing, for embedding images and captions."""

    def __init__(self, model: DualStreamModel, *, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.transform = item_transform(model)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def to(self, device: str | torch.device) -> RetrievalModel:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def encode_images(
        self,
        images: Sequence[ImageInput] | Tensor,
        captions: Sequence[str | None] | None = None,
        *,
        boxes: Sequence[Sequence[float] | None] | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        num_workers: int | None = None,
        precision: str = "fp32",
        progress: bool = False,
        bad_images: list[tuple[int, str]] | None = None,
    ) -> np.ndarray:
        """Embed images, optionally with their captions, into L2-normalised float32 rows ``[N, embed_dim]``.

        Args:
            images: paths, PIL images, ``[3, H, W]`` tensors, or one ``[N, 3, H, W]`` tensor (uint8, or float in
                [0, 1]); each is preprocessed as in training (resize, normalisation, padding option).
            captions: one caption per image (``None`` entries take the no-caption path); ``None`` = image only.
            boxes: one ``[x1, y1, x2, y2]`` item box per image (``None`` = whole image), cropped and padded as in
                training (the model's mode, margin and padding), so a detected item embeds like a GT-box item.
            batch_size: images per forward pass.
            device: overrides the model's device for this call.
            num_workers: decoding workers (default: up to 8 on CUDA when there are files to decode, else 0).
            precision: ``fp32``, or ``bf16`` / ``fp16`` autocast (bf16 also on CPUs with AVX512-BF16/AMX, where
                it roughly doubles throughput; rows are still returned as normalised float32).
            progress: show a progress bar.
            bad_images: ``None`` (default): an image file that cannot be decoded raises ``BadImageError`` naming
                it. A list: such files are skipped instead -- ``(input index, reason)`` is appended for each and
                its row is left all zeros, for the caller to drop (``on_bad_image: skip``).
        """
        if isinstance(images, str | Path):
            raise TypeError(
                f"encode_images expects a list of images, got the single path {str(images)!r}; "
                f"pass [{str(images)!r}]"
            )
        if precision not in _AUTOCAST:
            raise ConfigError(f"precision {precision!r} is not one of {sorted(_AUTOCAST)}")
        if isinstance(images, Tensor):
            if images.ndim != 4:
                raise ValueError(f"a batch tensor must be [N, 3, H, W], got {tuple(images.shape)}")
            images = list(images.unbind(0))
        images = list(images)
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"{len(boxes)} boxes for {len(images)} images")
        if device is not None:
            self.to(device)
        if num_workers is None:
            # On a GPU, decoding in worker processes keeps the device busy; on a CPU the model's own threads already
            # use the cores, and forking workers costs more than it saves unless the caller asks for them.
            has_paths = any(isinstance(im, str | Path) for im in images)
            busy = has_paths and self.device.type == "cuda" and len(images) > batch_size
            num_workers = min(8, os.cpu_count() or 1) if busy else 0
        loader = torch.utils.data.DataLoader(
            _ImageList(images, self.transform, boxes, skip_bad=bad_images is not None),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
        )
        out = np.empty((len(images), self.embed_dim), dtype=np.float32)
        start = 0
        dtype = _AUTOCAST[precision]
        autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)
        with torch.inference_mode(), autocast:
            for pixels, problems in tqdm(loader, desc="encode images", unit="batch", disable=not progress):
                end = start + pixels.shape[0]
                broken = [start + i for i, reason in enumerate(problems) if reason]
                pixels = pixels.to(self.device, non_blocking=True)
                if captions is None:
                    emb = self.model.encode_image(pixels)
                else:
                    chunk = captions[start:end]
                    tokens = self.model.tokenize([c or "" for c in chunk])
                    has = torch.tensor([c is not None for c in chunk], device=self.device)
                    feats = self.model.forward_features(
                        pixels,
                        tokens["input_ids"].to(self.device),
                        tokens["attention_mask"].to(self.device),
                        has_caption=has,
                    )
                    emb = self.model.forward_head(feats)
                out[start:end] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
                if broken and bad_images is not None:
                    out[broken] = 0.0
                    bad_images.extend((i, problems[i - start]) for i in broken)
                start = end
        return out

    def encode_captions(
        self, texts: Sequence[str], *, batch_size: int = 256, device: str | torch.device | None = None
    ) -> np.ndarray:
        """Caption-only embeddings (the ITC caption space), L2-normalised float32 rows."""
        if isinstance(texts, str):
            raise TypeError("encode_captions expects a list of captions, got a single string")
        if device is not None:
            self.to(device)
        texts = list(texts)
        out = np.empty((len(texts), self.model.config.itc_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.model.tokenize(texts[start : start + batch_size])
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                out[start : start + len(tokens["input_ids"])] = (
                    self.model.encode_text(tokens).float().cpu().numpy()
                )
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        return self.model.save_pretrained(directory)


# ------------------------------------------------------------------------------------ items and protocol


def encode_items(
    model: DualStreamModel,
    *,
    root: str | Path,
    split: str,
    items: Sequence[Item],
    captions: Sequence[str | None] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Embed DeepFashion2 items (crop or full image per the model's mode) with optional captions."""
    device = default_device(device)
    dataset = ItemDataset(
        root=root,
        split=split,
        items=items,
        labels=np.zeros(len(items), dtype=np.int64),
        transform=item_transform(model),
        captions=captions,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=ItemCollator(model.tokenize), num_workers=num_workers
    )
    was_training = model.training
    model.eval()
    out = np.empty((len(items), model.embed_dim), dtype=np.float32)
    use_text = captions is not None and any(c is not None for c in captions)
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"encode {split}", unit="batch", disable=not progress):
            pixels = batch["pixels"].to(device)
            if use_text:
                feats = model.forward_features(
                    pixels,
                    batch["input_ids"].to(device),
                    batch["attention_mask"].to(device),
                    has_caption=batch["has_caption"].to(device),
                )
            else:
                feats = model.forward_features(pixels)
            out[batch["index"].numpy()] = model.forward_head(feats).float().cpu().numpy()
    model.train(was_training)
    return out


def predict_item_boxes(
    model: DualStreamModel,
    *,
    root: str | Path,
    split: str,
    items: Sequence[Item],
    captions: Sequence[str | None],
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The box head's ``(cx, cy, w, h)`` for every captioned item, with the target box in the same input frame.

    The box head is text-conditioned (X-VLM): it says where the caption's item is, so only items with a caption
    are scored. Returns ``(predicted, target)``, both ``[M, 4]`` for the ``M`` captioned items, in input order.
    """
    keep = [i for i, c in enumerate(captions) if c is not None]
    device = default_device(device)
    if not keep:
        return np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)
    dataset = ItemDataset(
        root=root,
        split=split,
        items=[items[i] for i in keep],
        labels=np.zeros(len(keep), dtype=np.int64),
        transform=item_transform(model),
        captions=[captions[i] for i in keep],
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=ItemCollator(model.tokenize), num_workers=0
    )
    was_training = model.training
    model.eval()
    pred, target = np.empty((len(keep), 4), np.float32), np.empty((len(keep), 4), np.float32)
    with torch.inference_mode():
        for batch in loader:
            out = model(
                batch["pixels"].to(device),
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                has_caption=batch["has_caption"].to(device),
            )
            rows = batch["index"].numpy()
            pred[rows] = out.box.float().cpu().numpy()
            target[rows] = batch["box"].numpy()
    model.train(was_training)
    return pred, target


def box_quality(pred: np.ndarray, target: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Mean IoU and the rate of IoU >= ``threshold`` between ``(cx, cy, w, h)`` boxes (grounding accuracy)."""
    from torchvision.ops import box_convert, box_iou

    if len(pred) == 0:
        return {"box_count": 0.0}
    a = box_convert(torch.as_tensor(pred, dtype=torch.float64), "cxcywh", "xyxy")
    b = box_convert(torch.as_tensor(target, dtype=torch.float64), "cxcywh", "xyxy")
    iou = box_iou(a, b).diagonal()
    return {
        "box_miou": float(iou.mean()),
        f"box_iou@{threshold:g}": float((iou >= threshold).double().mean()),
        "box_count": float(len(pred)),
    }


@dataclass
class ItemRetrieval:
    """Features and metrics of one ground-truth-box evaluation."""

    metrics: dict[str, Any]
    query_features: np.ndarray
    gallery_features: np.ndarray
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    query_items: list[Item]
    gallery_items: list[Item]
    captions: dict[str, int]  # found / missing counts
    bad_images: list[dict[str, str]] = field(default_factory=list)  # skipped under on_bad_image="skip"


def evaluate_items(
    model: DualStreamModel,
    *,
    root: str | Path,
    split: str,
    captions: str | Path | dict[str, str] | None,
    ks: Sequence[int] = (1, 5, 10, 20),
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    rerank: str | None = None,
    rerank_topk: int = 100,
    index: str = "exact",
    progress: bool = False,
    min_caption_coverage: float = 0.5,
    on_bad_image: str = "error",
    items: Sequence[Item] | None = None,
) -> ItemRetrieval:
    """Ground-truth-box consumer-to-shop retrieval: user items (style > 0) query shop items (style > 0).

    Captions come from a caption store (or mapping); ``captions=None`` evaluates the image-only path. A store
    written for another split or annotation version, or covering less than ``min_caption_coverage`` of either
    side, is refused. ``items`` restricts the protocol to these items of the split (held-out train identities
    for model selection); ``None`` = every item of the split. ``on_bad_image="skip"`` scans the split's images
    first and leaves out every item whose image cannot be read (listed in ``bad_images`` and counted in
    ``metrics["skipped_images"]``); the default ``"error"`` stops at the first one, naming it.
    """
    from capret.data.captions import join_captions, split_fingerprint
    from capret.data.deepfashion2 import gt_box_protocol, image_path, load_items
    from capret.evaluation.retrieval_eval import evaluate_embeddings

    every = load_items(root, split, progress=progress)
    fingerprint = split_fingerprint(every)  # a caption store is bound to the whole split
    items = every if items is None else list(items)
    bad: list[dict[str, str]] = []
    if check_bad_image_policy(on_bad_image) == "skip":
        paired = sorted({it.image_id for it in items if it.style > 0})
        found = find_bad_images([image_path(root, split, i) for i in paired], progress=progress)
        bad = [{"file": str(path), "reason": reason} for path, reason in found]
        broken = {str(path) for path, _ in found}
        items = [it for it in items if str(image_path(root, split, it.image_id)) not in broken]
    queries, gallery = gt_box_protocol(items)
    if not queries.items or not gallery.items:
        raise DataError(f"{root}/{split}: the protocol needs user and shop items with style > 0")
    q_join, g_join = (
        join_captions(
            side.items, captions, split=split, fingerprint=fingerprint, min_coverage=min_caption_coverage
        )
        for side in (queries, gallery)
    )

    def encode(side: list[Item], side_captions: list[str | None]) -> np.ndarray:
        return encode_items(
            model,
            root=root,
            split=split,
            items=side,
            captions=side_captions if captions is not None else None,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )

    q_feats = encode(queries.items, q_join.captions)
    g_feats = encode(gallery.items, g_join.captions)

    def refs(side: list[Item]) -> list[tuple[str, tuple[float, float, float, float]]]:
        return [(str(image_path(root, split, it.image_id)), it.bbox) for it in side]

    metrics: dict[str, Any] = evaluate_embeddings(
        q_feats,
        g_feats,
        queries.labels,
        gallery.labels,
        ks=list(ks),
        index=index,
        rerank=rerank,
        rerank_topk=rerank_topk,
        query_images=refs(queries.items) if rerank else None,
        gallery_images=refs(gallery.items) if rerank else None,
    )
    if bad:
        metrics["skipped_images"] = len(bad)
    return ItemRetrieval(
        metrics=metrics,
        query_features=q_feats,
        gallery_features=g_feats,
        query_labels=queries.labels,
        gallery_labels=gallery.labels,
        query_items=queries.items,
        gallery_items=gallery.items,
        bad_images=bad,
        captions={
            "captions_found": q_join.found + g_join.found if captions else 0,
            "captions_missing": q_join.missing + g_join.missing if captions else len(q_feats) + len(g_feats),
        },
    )
