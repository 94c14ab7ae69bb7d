"""Compute-once feature caches for frozen encoders (CLIP4Cir stage 2, evaluation galleries).

Stage 2 of CLIP4Cir trains only the Combiner while CLIP stays frozen, so every image's CLIP feature is the
same in every epoch. Encoding each image once and reading the vector back afterwards turns an epoch from
hundreds of image-encoder passes into a few small MLP steps (see ``scripts/bench/combiner.py``).

A cache file is keyed by everything that changes the vectors: a hash of the encoder's *weights* (so a
fine-tuned stage-1 model never reuses the pretrained model's cache), the preprocessing description, the kind
of input and the exact ordered list of inputs. Files are safetensors with the input list stored in the
metadata, written atomically so an interrupted run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from capret.errors import DataError, MissingKeyError
from capret.io import atomic_write
from capret.models.clip import ClipBundle

__all__ = ["CachedFeatures", "cache_key", "encode_images", "encode_texts", "image_features", "text_features"]


@dataclass
class CachedFeatures:
    """Vectors ``[N, d]`` (float32, CPU) with the names they belong to, looked up by name."""

    names: list[str]
    features: torch.Tensor
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.names) != self.features.shape[0]:
            raise DataError(f"{len(self.names)} names but {self.features.shape[0]} feature rows")
        self.index = {name: i for i, name in enumerate(self.names)}

    def lookup(self, names: Sequence[str]) -> torch.Tensor:
        """Rows for ``names`` in the given order; an unknown name raises naming it."""
        try:
            rows = [self.index[n] for n in names]
        except KeyError as exc:
            raise MissingKeyError(
                f"{exc.args[0]!r} is not in the feature cache ({len(self.names)} entries)"
            ) from None
        return self.features[rows]


def cache_key(*, fingerprint: str, preprocess_id: str, kind: str, names: Sequence[str]) -> str:
    """Hex digest identifying one cache file; any change of weights, preprocessing or inputs changes it."""
    digest = hashlib.sha256()
    for part in (fingerprint, preprocess_id, kind):
        digest.update(part.encode())
        digest.update(b"\0")
    for name in names:
        digest.update(name.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


class _ImageList(Dataset):
    def __init__(self, names: Sequence[str], load: Callable[[str], Any], transform: Callable) -> None:
        self.names, self.load, self.transform = list(names), load, transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.load(self.names[i]))


@torch.no_grad()
def encode_images(
    clip: ClipBundle,
    names: Sequence[str],
    *,
    load_image: Callable[[str], Any],
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "image features",
) -> torch.Tensor:
    """Raw CLIP image features ``[N, d]`` (float32, CPU) of the named images, in order, without caching."""
    loader = DataLoader(
        _ImageList(names, load_image, clip.transform), batch_size=batch_size, num_workers=num_workers
    )
    device = clip.device
    was_training = clip.training
    clip.eval()
    chunks = [
        clip.image_features(batch.to(device)).float().cpu()
        for batch in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 2)
    ]
    clip.train(was_training)
    if not chunks:
        return torch.zeros(0, clip.feature_dim)
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(
    clip: ClipBundle, texts: Sequence[str], *, batch_size: int = 256, desc: str = "text features"
) -> torch.Tensor:
    """Raw CLIP text features ``[N, d]`` (float32, CPU) of ``texts``, in order, without caching."""
    device = clip.device
    was_training = clip.training
    clip.eval()
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2):
        tokens = clip.tokenize(texts[start : start + batch_size])
        chunks.append(clip.text_features(**{k: v.to(device) for k, v in tokens.items()}).float().cpu())
    clip.train(was_training)
    if not chunks:
        return torch.zeros(0, clip.feature_dim)
    return torch.cat(chunks)


def _cached(
    clip: ClipBundle,
    kind: Literal["image", "text"],
    names: Sequence[str],
    compute: Callable[[list[str]], torch.Tensor],
    *,
    cache_dir: str | Path | None,
    fingerprint: str | None,
) -> CachedFeatures:
    """Features of ``names`` (duplicates removed, order kept) from ``cache_dir``, or ``compute``d and stored.

    The cache key holds the tower's weights fingerprint and its input processing (image preprocessing or
    tokenizer). The weights are hashed only when a cache is used and no ``fingerprint`` was passed, so an
    uncached call never pays for it.
    """
    unique = list(dict.fromkeys(names))
    if cache_dir is None:
        return CachedFeatures(unique, compute(unique))
    preprocess_id = clip.preprocess_id if kind == "image" else clip.tokenizer_id
    if fingerprint is None:
        fingerprint = clip.image_fingerprint() if kind == "image" else clip.text_fingerprint()
    key = cache_key(fingerprint=fingerprint, preprocess_id=preprocess_id, kind=kind, names=unique)
    path = Path(cache_dir) / f"{kind}-{key}.safetensors"
    if path.is_file():
        stored = load_file(str(path))["features"]
        if stored.shape[0] == len(unique):
            return CachedFeatures(unique, stored)
    features = compute(unique)
    meta = {
        "kind": kind,
        "fingerprint": fingerprint,
        "preprocess": preprocess_id,
        "names": json.dumps(unique),
    }
    atomic_write(path, lambda tmp: save_file({"features": features.contiguous()}, str(tmp), metadata=meta))
    return CachedFeatures(unique, features)


def image_features(
    clip: ClipBundle,
    names: Sequence[str],
    *,
    load_image: Callable[[str], Any],
    cache_dir: str | Path | None = None,
    fingerprint: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> CachedFeatures:
    """Image features of ``names`` (duplicates removed, order kept), read from ``cache_dir`` when present.

    ``fingerprint`` (``clip.image_fingerprint()``) may be passed to avoid re-hashing the weights on every
    call; ``cache_dir=None`` disables caching.
    """

    def compute(unique: list[str]) -> torch.Tensor:
        return encode_images(
            clip, unique, load_image=load_image, batch_size=batch_size, num_workers=num_workers
        )

    return _cached(clip, "image", names, compute, cache_dir=cache_dir, fingerprint=fingerprint)


def text_features(
    clip: ClipBundle,
    texts: Sequence[str],
    *,
    cache_dir: str | Path | None = None,
    fingerprint: str | None = None,
    batch_size: int = 256,
) -> CachedFeatures:
    """Text features per unique caption string, cached like :func:`image_features`.

    ``fingerprint`` is ``clip.text_fingerprint()`` when not given.
    """

    def compute(unique: list[str]) -> torch.Tensor:
        return encode_texts(clip, unique, batch_size=batch_size)

    return _cached(clip, "text", texts, compute, cache_dir=cache_dir, fingerprint=fingerprint)
