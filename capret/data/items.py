"""DeepFashion2 items as training/evaluation samples: preprocessing with box tracking, dataset, P x K sampler.

* :class:`ItemTransform` turns an image and an item box into the model's input tensor and the item box in
  normalised ``(cx, cy, w, h)`` of that input (the box-head target). ``crop`` mode cuts the item with a context
  margin; ``full`` mode keeps the whole image, so the caption has to tell the model which item is meant (X-VLM's
  text-conditioned localisation). Optional CLIP4Cir padding (``targetpad``/``squarepad``) before resizing.
  Augmentations (scale/translation jitter that keeps the item, horizontal flip, colour jitter) draw from an
  explicit ``torch.Generator``: a sample's randomness depends only on its seed, never on worker scheduling,
  which is what makes ``--resume`` exact.
* :class:`ItemDataset` pairs items with their captions and identity labels; it accepts an index or an
  ``(index, sample_seed)`` pair from :class:`PKBatchSampler`, and drops captions at random during training
  (``caption_dropout``) so one model learns both the caption-augmented and the image-only path.
* :class:`PKBatchSampler`: P identities x K items per batch, mixing user (consumer) and shop items of each
  identity — the batch structure metric learning on consumer-to-shop data needs (every identity in a batch
  has a positive from the other domain). Deterministic given ``(seed, epoch)``; batches are split over ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import Tensor

from capret.data.deepfashion2 import Item, image_path, open_image
from capret.data.imagefile import check_bad_image_policy, decode_image
from capret.errors import BadImageError, ConfigError, DataError, MissingImageError

__all__ = [
    "ITEM_DECODES",
    "ItemCollator",
    "ItemDataset",
    "ItemTransform",
    "PKBatchSampler",
    "check_holdout_fraction",
    "draw_holdout",
    "identity_labels",
    "split_holdout_identities",
]


#: photo decoding of :class:`ItemDataset` (``pil`` is today's path and the reference of the other two)
ITEM_DECODES = ("pil", "torchvision", "reduced")


def _bicubic() -> Any:
    return Image.Resampling.BICUBIC


@dataclass(frozen=True)
class ItemTransform:
    """Image (+ item box) -> normalised input tensor ``[3, S, S]`` and the item box ``(cx, cy, w, h)`` in [0, 1].

    Args:
        image_size: side of the square model input.
        mean, std: normalisation of the visual encoder (its own data config).
        mode: ``crop`` (item crop with ``crop_margin`` context) or ``full`` (whole image).
        crop_margin: context margin around the box in crop mode, as a fraction of the box size.
        pad: ``none``, ``targetpad`` (CLIP4Cir TargetPad 1.25) or ``squarepad`` before resizing.
        augment: training augmentations (needs a generator per call).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "crop"
    crop_margin: float = 0.1
    pad: str = "none"
    augment: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("crop", "full"):
            raise ConfigError(f"ItemTransform mode {self.mode!r} is not one of ['crop', 'full']")
        if self.pad not in ("none", "targetpad", "squarepad"):
            raise ConfigError(
                f"ItemTransform pad {self.pad!r} is not one of ['none', 'targetpad', 'squarepad']"
            )

    def __call__(
        self,
        image: Image.Image,
        bbox: Sequence[float] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        box = np.asarray(bbox if bbox is not None else (0, 0, width, height), dtype=np.float64)
        box = np.clip(box, [0, 0, 0, 0], [width, height, width, height])
        if self.mode == "crop" and bbox is not None:
            image, box = self._crop(image, box)
        if self.pad != "none":
            image, box = self._pad(image, box)
        if self.augment:
            if generator is None:
                raise ValueError("ItemTransform(augment=True) needs a torch.Generator per sample")
            image, box = self._augment(image, box, generator)
        w, h = image.size
        image = image.resize((self.image_size, self.image_size), _bicubic())
        pixels = (
            torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        )
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        pixels = (pixels - mean) / std
        x1, y1, x2, y2 = box
        cxcywh = torch.tensor(
            [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h], dtype=torch.float32
        )
        return pixels, cxcywh.clamp_(0.0, 1.0)

    def reduce_factor(self, size: tuple[int, int], bbox: Sequence[float] | None) -> int:
        """Largest JPEG decode reduction (8, 4, 2, else 1) that never makes the resize an upscale.

        The transform resizes the region it keeps (the item crop with its margin in ``crop`` mode, the whole
        photo in ``full`` mode; the augmentation window keeps at least 75% of each side; padding only adds) to
        ``image_size``. When that region is at least ``reduce * image_size`` pixels on its shorter side, decoding
        the photo at ``1/reduce`` of its size (:func:`~capret.data.imagefile.decode_image`) still leaves the
        resize a downscale, so the reduced decode loses little but skips most of the decoding work.
        """
        width, height = size
        if self.mode == "crop" and bbox is not None:
            x1, y1, x2, y2 = (float(v) for v in bbox)
            x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
            y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
            short = min((x2 - x1) * (1 + 2 * self.crop_margin), (y2 - y1) * (1 + 2 * self.crop_margin))
            short = min(short, float(width), float(height))
        else:
            short = float(min(width, height))
        if self.augment:
            short *= 0.75
        for factor in (8, 4, 2):
            if short >= factor * self.image_size:
                return factor
        return 1

    def _crop(self, image: Image.Image, box: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        x1, y1, x2, y2 = box
        dx, dy = (x2 - x1) * self.crop_margin, (y2 - y1) * self.crop_margin
        width, height = image.size
        left = min(max(0, int(np.floor(x1 - dx))), width - 1)
        top = min(max(0, int(np.floor(y1 - dy))), height - 1)
        right = max(min(width, int(np.ceil(x2 + dx))), left + 1)
        bottom = max(min(height, int(np.ceil(y2 + dy))), top + 1)
        crop = image.crop((left, top, right, bottom))
        shifted = np.clip(box - [left, top, left, top], 0, [right - left, bottom - top] * 2)
        return crop, shifted

    def _pad(self, image: Image.Image, box: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        from capret.data.transforms import SquarePad, TargetPad

        padder = TargetPad(1.25) if self.pad == "targetpad" else SquarePad()
        w, h = image.size
        padded = padder(image)
        # Both pads add the same number of pixels on opposite sides, so the offset is half the growth.
        ox, oy = (padded.size[0] - w) // 2, (padded.size[1] - h) // 2
        return padded, box + [ox, oy, ox, oy]

    def _augment(
        self, image: Image.Image, box: np.ndarray, generator: torch.Generator
    ) -> tuple[Image.Image, np.ndarray]:
        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        width, height = image.size
        # Scale/translation jitter: a window of 75-100% of each side that keeps the box centre inside.
        cw, ch = max(1, round(width * uniform(0.75, 1.0))), max(1, round(height * uniform(0.75, 1.0)))
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        lo_x, hi_x = max(0.0, cx - cw + 1), min(float(width - cw), cx)
        lo_y, hi_y = max(0.0, cy - ch + 1), min(float(height - ch), cy)
        left = int(uniform(lo_x, hi_x)) if hi_x > lo_x else int(max(0, min(width - cw, lo_x)))
        top = int(uniform(lo_y, hi_y)) if hi_y > lo_y else int(max(0, min(height - ch, lo_y)))
        image = image.crop((left, top, left + cw, top + ch))
        box = np.clip(box - [left, top, left, top], 0, [cw, ch, cw, ch])
        if float(torch.rand((), generator=generator)) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            box = np.asarray([cw - box[2], box[1], cw - box[0], box[3]])
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhancer(image).enhance(uniform(0.7, 1.3))
        return image, box


def identity_labels(items: Sequence[Item]) -> tuple[np.ndarray, dict[tuple[int, int], int]]:
    """Contiguous integer labels of ``(pair_id, style)`` identities (sorted), for ArcFace's class table."""
    table = {identity: i for i, identity in enumerate(sorted({it.identity for it in items}))}
    return np.asarray([table[it.identity] for it in items], dtype=np.int64), table


class ItemDataset(torch.utils.data.Dataset):
    """DeepFashion2 items with their captions and identity labels.

    Args:
        root, split: dataset root and split (images opened lazily from ``<root>/<split>/image``).
        items: the items (e.g. ``load_items(root, split)`` filtered to ``style > 0``).
        labels: integer identity label per item.
        transform: the :class:`ItemTransform`.
        captions: caption per item (``None`` = no caption for that item), aligned with ``items``.
        caption_dropout: probability of hiding a caption in a seeded (training) sample.
        on_bad_image: ``error`` or ``skip`` (see :data:`~capret.data.imagefile.BAD_IMAGE_POLICIES`).
        decode: how photos are decoded, one of :data:`ITEM_DECODES`: ``pil`` (today's path, the reference),
            ``torchvision`` (bit-identical pixels, faster decoder) or ``reduced`` (JPEG DCT-domain decoding at
            1/2, 1/4 or 1/8 of the photo when :meth:`ItemTransform.reduce_factor` allows, box scaled with it:
            not pixel-identical, see docs/performance.md).
    """

    def __init__(
        self,
        *,
        root: str | Path,
        split: str,
        items: Sequence[Item],
        labels: np.ndarray,
        transform: ItemTransform,
        captions: Sequence[str | None] | None = None,
        caption_dropout: float = 0.0,
        on_bad_image: str = "error",
        decode: str = "pil",
    ) -> None:
        if len(labels) != len(items):
            raise ValueError(f"{len(labels)} labels for {len(items)} items")
        if captions is not None and len(captions) != len(items):
            raise ValueError(f"{len(captions)} captions for {len(items)} items")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.root, self.split = Path(root), split
        self.items = list(items)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.captions = list(captions) if captions is not None else [None] * len(self.items)
        self.caption_dropout = caption_dropout
        self.on_bad_image = check_bad_image_policy(on_bad_image)
        if decode not in ITEM_DECODES:
            raise ConfigError(f"ItemDataset decode {decode!r} is not one of {list(ITEM_DECODES)}")
        self.decode = decode

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, item: Item) -> tuple[Image.Image, Sequence[float]]:
        """The item's photo decoded the ``decode`` way, and its box in that photo's pixels."""
        if self.decode == "pil":
            return open_image(self.root, self.split, item.image_id), item.bbox
        path = image_path(self.root, self.split, item.image_id)
        if self.decode == "torchvision":
            return decode_image(path, decoder="torchvision"), item.bbox
        if not path.is_file():
            raise MissingImageError("image not found", path=path)
        try:
            with Image.open(path) as probe:  # the header only: the size decides the reduction
                width, height = probe.size
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImageError(
                f"cannot read image header ({type(exc).__name__}: {exc})", path=path
            ) from None
        image = decode_image(path, reduce=self.transform.reduce_factor((width, height), item.bbox))
        if image.size == (width, height):
            return image, item.bbox
        sx, sy = image.size[0] / width, image.size[1] / height
        x1, y1, x2, y2 = item.bbox
        return image, (x1 * sx, y1 * sy, x2 * sx, y2 * sy)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        item = self.items[index]
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        try:
            image, bbox = self._load(item)
        except BadImageError as exc:
            if self.on_bad_image == "error":
                raise
            # skip: the collator leaves the sample out and reports the file in the batch's "bad_images"
            return {"bad_image": str(exc.path or exc), "index": index}
        pixels, box = self.transform(image, bbox, generator=generator)
        caption = self.captions[index]
        if caption is not None and generator is not None and self.caption_dropout > 0:
            if float(torch.rand((), generator=generator)) < self.caption_dropout:
                caption = None
        return {
            "pixels": pixels,
            "box": box,
            "label": int(self.labels[index]),
            "caption": caption or "",
            "has_caption": caption is not None,
            "index": index,
        }


@dataclass
class ItemCollator:
    """Stacks samples and tokenizes their captions (empty for caption-less samples, masked by ``has_caption``)."""

    tokenize: Any  # callable list[str] -> {"input_ids", "attention_mask"}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack the samples; ones whose image could not be read (``on_bad_image: skip``) are left out and their
        files listed under ``"bad_images"`` (present only when there are some)."""
        bad = [s["bad_image"] for s in samples if "bad_image" in s]
        samples = [s for s in samples if "bad_image" not in s]
        if not samples:
            raise BadImageError(f"every image of a batch is unreadable ({', '.join(bad[:3])} ...)")
        tokens = self.tokenize([s["caption"] for s in samples])
        batch: dict[str, Any] = {
            "pixels": torch.stack([s["pixels"] for s in samples]),
            "box": torch.stack([s["box"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "has_caption": torch.tensor([s["has_caption"] for s in samples], dtype=torch.bool),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }
        if bad:
            batch["bad_images"] = bad
        return batch


class PKBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """P identities x K items per batch, mixing shop and user items, deterministic given ``(seed, epoch)``.

    For each identity the K picks alternate between its shop and user items (each pool shuffled; cycled when an
    identity has fewer than K items of a kind), so a batch always pairs both domains when the identity has them.
    Every pick gets its own sample seed for the augmentations. Batches ``rank, rank + world_size, ...`` go to
    ``rank``; the epoch is cut to a multiple of ``world_size`` so all ranks take the same number of steps.

    Args:
        labels: identity label per dataset index.
        sources: ``"user"``/``"shop"`` per dataset index.
        p, k: identities per batch and items per identity.
        seed, epoch: the randomness of this epoch.
        rank, world_size: this process's share of the batches.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        sources: Sequence[str],
        *,
        p: int,
        k: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if p < 1 or k < 1:
            raise ConfigError(f"P x K sampler needs p >= 1 and k >= 1, got p={p}, k={k}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        labels = np.asarray(labels)
        if len(labels) != len(sources):
            raise ValueError(f"{len(labels)} labels for {len(sources)} sources")
        self.p, self.k, self.seed, self.epoch = p, k, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.pools: dict[int, tuple[list[int], list[int]]] = {}
        for index, (label, source) in enumerate(zip(labels.tolist(), sources)):
            shop, user = self.pools.setdefault(int(label), ([], []))
            (shop if source == "shop" else user).append(index)
        if len(self.pools) < p:
            raise ConfigError(f"P x K sampler: only {len(self.pools)} identities for p={p} per batch")
        total = len(self.pools) // p
        self.num_batches = (total // world_size) * world_size
        if self.num_batches == 0:
            raise ConfigError(
                f"{len(self.pools)} identities give no batch of p={p} for each of {world_size} ranks"
            )

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def batches(self) -> list[list[tuple[int, int]]]:
        """Every batch of the epoch (all ranks), as ``(dataset index, sample seed)`` pairs."""
        rng = np.random.default_rng([self.seed, self.epoch])
        identities = np.array(sorted(self.pools))
        rng.shuffle(identities)
        out = []
        for b in range(self.num_batches):
            batch: list[tuple[int, int]] = []
            for label in identities[b * self.p : (b + 1) * self.p].tolist():
                for index in self._pick(label, rng):
                    batch.append((index, int(rng.integers(0, 2**31 - 1))))
            out.append(batch)
        return out

    def _pick(self, label: int, rng: np.random.Generator) -> list[int]:
        shop, user = (list(rng.permutation(pool)) for pool in self.pools[label])
        order = [pool for pool in (shop, user) if pool]
        picks = []
        for i in range(self.k):
            pool = order[i % len(order)]
            picks.append(int(pool[(i // len(order)) % len(pool)]))
        return picks

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.batches()[self.rank :: self.world_size]


def check_holdout_fraction(fraction: float, *, field: str) -> None:
    """A holdout share (config field ``field``) must lie in [0, 1): something has to remain to train on."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"{field} must be in [0, 1), got {fraction}")


def draw_holdout(keys: Sequence[Any], *, fraction: float, seed: int, field: str, what: str) -> set[Any]:
    """The keys held out of training for model selection: ``max(1, round(fraction * len(keys)))`` of them (none
    when ``fraction`` is 0; at most all but one, so one remains to train on), by a seeded permutation of the
    sorted keys, so a config and seed always hold out the same ones whatever order the data lists them in.

    ``field`` names the config field of ``fraction`` and ``what`` the keys (in the error of fewer than two).
    """
    check_holdout_fraction(fraction, field=field)
    if fraction == 0.0:
        return set()
    ordered = sorted(keys)
    if len(ordered) < 2:
        raise DataError(
            f"{field}={fraction}: only {len(ordered)} {what}; at least 2 are needed (set {field}=0 to train "
            "without selection)"
        )
    count = min(max(1, round(fraction * len(ordered))), len(ordered) - 1)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[i] for i in order[:count]}


def split_holdout_identities(
    items: Sequence[Item], *, fraction: float, seed: int
) -> tuple[list[Item], list[Item]]:
    """``(training items, held-out items)``: whole identities held out of a *train* split for model selection.

    Checkpoints must never be selected on the split that is reported (DESIGN.md), so validation during
    training runs on identities the model never trains on, drawn from the train split itself. Only identities
    with at least one user and one shop item can be scored by the consumer-to-shop protocol, so only those are
    drawn: ``max(1, round(fraction * eligible))`` of them (none when ``fraction`` is 0), by a seeded permutation
    of the sorted identities (:func:`draw_holdout`), so a config and seed always hold out the same garments.
    """
    sources: dict[tuple[int, int], set[str]] = {}
    for item in items:
        sources.setdefault(item.identity, set()).add(item.source)
    eligible = [identity for identity, seen in sources.items() if {"user", "shop"} <= seen]
    held = draw_holdout(
        eligible,
        fraction=fraction,
        seed=seed,
        field="data.holdout_identities",
        what="train identities have both user and shop items",
    )
    return [it for it in items if it.identity not in held], [it for it in items if it.identity in held]
