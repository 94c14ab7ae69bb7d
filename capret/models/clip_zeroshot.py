"""Zero-shot classification with any CLIP bundle: prompt-ensembled class embeddings, cosine argmax.

Radford et al. (CLIP, 2021, Sec. 3.1.4) classify an image by embedding one sentence per class ("a photo of a
{class}."), optionally averaged over several templates (prompt ensembling: the mean of the L2-normalised text
embeddings, normalised again), and taking the class whose embedding is most similar to the image's. The same
calls serve the category metric of task ``clip`` and the attribute choices of the ``clip`` caption backend.
Nothing here reads a label: labels only ever meet predictions in the caller's scoring code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from capret.errors import ConfigError
from capret.models.clip_base import ClipBundle

__all__ = ["Box", "class_embeddings", "crop_to_box", "encode_pil_images", "zero_shot_scores"]

Box = tuple[float, float, float, float]


@torch.no_grad()
def class_embeddings(
    clip: ClipBundle, class_names: Sequence[str], *, templates: Sequence[str] = ("a photo of a {}.",)
) -> torch.Tensor:
    """``[C, d]`` L2-normalised class embeddings: each class's templates embedded, averaged, renormalised.

    Args:
        clip: any CLIP bundle (open_clip or Hugging Face).
        class_names: one name (or whole prompt) per class, written into each template's ``{}``.
        templates: sentence patterns with one ``{}``; more than one gives CLIP's prompt ensembling.
    """
    if not class_names:
        raise ConfigError("class_embeddings needs at least one class name")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ConfigError(f"every template must hold exactly one '{{}}', got {list(templates)}")
    texts = [t.format(name) for name in class_names for t in templates]
    emb = clip.encode_text(texts).float().reshape(len(class_names), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def crop_to_box(image: Image.Image, box: Box | None) -> Image.Image:
    """``image`` cropped to ``box`` (``[x1, y1, x2, y2]`` pixels, clamped to the image, at least 1 pixel)."""
    if box is None:
        return image
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    x1, y1 = max(0, min(x1, image.width - 1)), max(0, min(y1, image.height - 1))
    x2, y2 = min(image.width, max(x2, x1 + 1)), min(image.height, max(y2, y1 + 1))
    return image.crop((x1, y1, x2, y2))


@torch.no_grad()
def encode_pil_images(
    clip: ClipBundle,
    images: Sequence[Image.Image],
    *,
    boxes: Sequence[Box | None] | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """``[N, d]`` L2-normalised image embeddings of PIL images, each cropped to its box first (None = whole).

    The bundle's own preprocessing is applied (padding + the model's resize/normalisation), so the pixels are
    prepared exactly as the exported model expects.
    """
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"{len(images)} images for {len(boxes)} boxes")
    box_list: list[Box | None] = list(boxes) if boxes is not None else [None] * len(images)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [
            clip.transform(crop_to_box(img.convert("RGB"), box))
            for img, box in zip(images[start : start + batch_size], box_list[start : start + batch_size])
        ]
        if chunk:
            out.append(clip.encode_image(torch.stack(chunk).to(clip.device)).float().cpu())
    if not out:
        return torch.zeros(0, clip.feature_dim)
    return torch.cat(out)


def zero_shot_scores(image_embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` cosine similarities of normalised image embeddings to normalised class embeddings."""
    if image_embeddings.shape[-1] != classes.shape[-1]:
        raise ValueError(
            f"image embeddings of width {image_embeddings.shape[-1]} vs class embeddings of {classes.shape[-1]}"
        )
    return image_embeddings.float() @ classes.float().to(image_embeddings.device).T
