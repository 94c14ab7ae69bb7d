"""Geometric verification: SIFT local features + matching + RANSAC inlier counts rerank a global top-K.

The classic spatial-verification stage of instance retrieval (Philbin et al., CVPR 2007; DELG's GV, Cao et al.,
ECCV 2020: top-100, inliers first, then global score). Everything comes from kornia and needs no downloaded
weights: ``SIFTFeature`` (one image at a time, fast on CPU) or ``SIFTFeatureScaleSpace`` (batched with padding
masks, for GPUs) with RootSIFT descriptors; Lowe's ratio test (``snn``), mutual nearest neighbours (``mnn``) or
both (``smnn``); ``kornia.geometry.RANSAC`` with a homography (default; clothing on a flat-ish surface seen from
another viewpoint), an affine model, or a fundamental matrix.

Item boxes are respected: each image reference ``(path, bbox)`` is cropped to the box (grown by ``margin`` of
its size on each side) and resized so its longest side is at most ``max_side`` before extraction. Gallery
features are extracted once and cached on disk as safetensors, keyed by the image path, its size and mtime,
the box and the extractor settings, so changing any of them never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import kornia
import kornia.feature as KF
import numpy as np
import torch
from kornia.feature.scale_space_detector import get_default_detector_config
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from capret.data.imagefile import decode_image
from capret.errors import ConfigError, DataError
from capret.io import atomic_write, default_device
from capret.retrieval.rerank.base import (
    FeatureReranker,
    ImageRef,
    RerankInputs,
    append_tail,
    register_reranker,
    require_image_refs,
    sort_rows,
)
from capret.retrieval.rerank.ransac import ransac_homography_batch

__all__ = [
    "GeometricVerification",
    "LocalFeatureExtractor",
    "LocalFeatureSettings",
    "LocalFeatures",
    "MatchSettings",
    "count_inliers",
    "load_crop",
    "match_descriptors",
    "match_many",
    "ransac_homography_batch",
]

_EXTRACTORS = ("auto", "sift", "sift_scalespace")
_MATCHERS = ("snn", "mnn", "smnn")
_MODELS = {"homography": 4, "affine": 3, "fundamental": 7}  # model -> minimal sample size
_MODES = ("inliers", "blend")
_RANSACS = ("batched", "kornia")
_DESCRIPTORS = ("patch", "pyramid")


@dataclass(frozen=True)
class LocalFeatureSettings:
    """What determines the local features of an image reference (part of the cache key)."""

    extractor: str = "sift"  # sift (per image) | sift_scalespace (batched with masks)
    num_features: int = 256  # keypoints kept per crop (strongest responses)
    max_side: int = 256  # crops are downscaled so their longest side is at most this (speed)
    margin: float = 0.05  # box grown by this fraction of its width/height on each side before cropping
    rootsift: bool = True  # RootSIFT descriptors (Arandjelović and Zisserman, CVPR 2012)
    upsample: bool = (
        False  # detect on a 2x upsampled first level too (kornia's default; ~4x the detector cost)
    )
    descriptor: str = "patch"  # patch (41x41 patches, more accurate) | pyramid (no patch extraction, faster)

    def tag(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class LocalFeatures(NamedTuple):
    keypoints: torch.Tensor  # [N, 2] float32, (x, y) in the resized crop's pixels
    descriptors: torch.Tensor  # [N, 128] float32


#: shortest side a crop is upsampled to before SIFT (smaller ones break the scale-space pyramid)
MIN_SIDE = 64


def load_crop(ref: ImageRef, *, margin: float, max_side: int) -> torch.Tensor:
    """Grayscale ``[1, 1, H, W]`` float tensor in [0, 1] of the box crop of ``ref``, longest side <= max_side."""
    path, bbox = ref
    image = decode_image(path)  # a missing or corrupt file raises BadImageError naming it
    if bbox is not None:
        x1, y1, x2, y2 = (float(v) for v in bbox)
        if not (x2 > x1 and y2 > y1):
            raise DataError(f"{path}: box {list(bbox)} is not [x1, y1, x2, y2] with x2 > x1 and y2 > y1")
        dx, dy = margin * (x2 - x1), margin * (y2 - y1)
        box = (
            max(0, int(np.floor(x1 - dx))),
            max(0, int(np.floor(y1 - dy))),
            min(image.width, int(np.ceil(x2 + dx))),
            min(image.height, int(np.ceil(y2 + dy))),
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DataError(f"{path}: box {list(bbox)} lies outside the {image.width}x{image.height} image")
        image = image.crop(box)
    scale = max_side / max(image.width, image.height)
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    if min(image.width, image.height) < MIN_SIDE:
        # SIFT's scale-space pyramid halves the image several times and pads with reflection, which fails on
        # a few-pixel octave; tiny crops are upsampled instead (they carry few keypoints either way).
        up = MIN_SIDE / min(image.width, image.height)
        image = image.resize((round(image.width * up), round(image.height * up)), Image.Resampling.BILINEAR)
    rgb = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return kornia.color.rgb_to_grayscale(rgb)


class LocalFeatureExtractor:
    """SIFT features of image references with an in-memory and an on-disk (safetensors) cache."""

    def __init__(
        self,
        settings: LocalFeatureSettings | None = None,
        *,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        batch_size: int = 16,
        cpu_threads: int | None = 1,
    ) -> None:
        settings = settings or LocalFeatureSettings()
        self.device = default_device(device)
        if settings.extractor not in _EXTRACTORS:
            raise ConfigError(f"unknown extractor {settings.extractor!r}; valid: {', '.join(_EXTRACTORS)}")
        if settings.descriptor not in _DESCRIPTORS:
            raise ConfigError(f"unknown descriptor {settings.descriptor!r}; valid: {', '.join(_DESCRIPTORS)}")
        if settings.extractor == "auto":
            chosen = "sift_scalespace" if self.device.type == "cuda" else "sift"
            settings = LocalFeatureSettings(**{**asdict(settings), "extractor": chosen})
        self.settings = settings
        self.batch_size = batch_size if settings.extractor == "sift_scalespace" else 1
        self.cache_dir = Path(cache_dir) / settings.tag() if cache_dir else None
        self._memory: dict[str, LocalFeatures] = {}
        self._model: torch.nn.Module | None = None
        # SIFT on a few-hundred-pixel crop is hundreds of tiny ops: one intra-op thread avoids the OpenMP
        # barrier cost that made 2 threads 2x slower than 1 on a busy 2-core machine (None: torch's setting).
        self.cpu_threads = cpu_threads

    def _sift(self) -> torch.nn.Module:
        if self._model is None:
            s = self.settings
            options: dict[str, Any] = {
                "num_features": s.num_features,
                "rootsift": s.rootsift,
                "device": self.device,
                "descriptor_backend": s.descriptor,
            }
            if s.extractor == "sift_scalespace":
                self._model = KF.SIFTFeatureScaleSpace(**options).eval()
            else:
                config = get_default_detector_config()
                config["up_levels"] = 1 if s.upsample else 0
                self._model = KF.SIFTFeature(**options, config=config).eval()
        return self._model

    def key(self, ref: ImageRef) -> str:
        path, bbox = ref
        stat = os.stat(path)
        box = None if bbox is None else [round(float(v), 2) for v in bbox]
        raw = json.dumps(
            [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, box, self.settings.tag()]
        )
        return hashlib.sha1(raw.encode()).hexdigest()

    def _cache_file(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.safetensors"

    def _read_cache(self, key: str) -> LocalFeatures | None:
        path = self._cache_file(key)
        if path is None or not path.is_file():
            return None
        tensors = load_file(str(path))
        return LocalFeatures(tensors["keypoints"].float(), tensors["descriptors"].float())

    def _write_cache(self, key: str, feats: LocalFeatures) -> None:
        path = self._cache_file(key)
        if path is None:
            return
        tensors = {
            "keypoints": feats.keypoints.contiguous(),
            "descriptors": feats.descriptors.half().contiguous(),
        }
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))

    def _run(self, crops: list[torch.Tensor]) -> list[LocalFeatures]:
        """SIFT on crops: one by one, or as one zero-padded batch with validity masks (scale-space backend)."""
        model = self._sift()
        threads = torch.get_num_threads()
        if self.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        try:
            return self._describe(model, crops)
        finally:
            torch.set_num_threads(threads)

    def _describe(self, model: torch.nn.Module, crops: list[torch.Tensor]) -> list[LocalFeatures]:
        out = []
        with torch.inference_mode():
            if len(crops) == 1:
                lafs, resp, desc = model(crops[0].to(self.device))
                masks = None
            else:
                h = max(c.shape[2] for c in crops)
                w = max(c.shape[3] for c in crops)
                batch = torch.zeros((len(crops), 1, h, w), device=self.device)
                masks = torch.zeros_like(batch)
                for i, c in enumerate(crops):
                    batch[i, :, : c.shape[2], : c.shape[3]] = c[0].to(self.device)
                    masks[i, :, : c.shape[2], : c.shape[3]] = 1.0
                lafs, resp, desc = model(batch, masks)
            centres = KF.get_laf_center(lafs)
            for i, crop in enumerate(crops):
                xy = centres[i]
                keep = (resp[i] > 0) & (xy[:, 0] < crop.shape[3]) & (xy[:, 1] < crop.shape[2])
                out.append(LocalFeatures(xy[keep].float().cpu(), desc[i][keep].float().cpu()))
        return out

    def extract(self, refs: list[ImageRef], *, progress: bool = False) -> list[LocalFeatures]:
        """Features of every reference (cache first); missing ones are extracted in batches and cached."""
        keys = [self.key(ref) for ref in refs]
        result: list[LocalFeatures | None] = []
        todo: list[int] = []
        for i, key in enumerate(keys):
            feats = self._memory.get(key) or self._read_cache(key)
            if feats is not None:
                self._memory[key] = feats
            else:
                todo.append(i)
            result.append(feats)
        s = self.settings
        for start in tqdm(
            range(0, len(todo), self.batch_size), desc="SIFT", disable=not progress or not todo, leave=False
        ):
            chunk = todo[start : start + self.batch_size]
            crops = [load_crop(refs[i], margin=s.margin, max_side=s.max_side) for i in chunk]
            for i, feats in zip(chunk, self._run(crops)):
                self._write_cache(keys[i], feats)
                self._memory[keys[i]] = feats
                result[i] = feats
        return [r for r in result if r is not None]


def match_descriptors(
    desc1: torch.Tensor, desc2: torch.Tensor, *, matcher: str, ratio: float
) -> torch.Tensor:
    """Tentative correspondences ``[M, 2]`` (index into desc1, index into desc2)."""
    if desc1.shape[0] < 2 or desc2.shape[0] < 2:
        return torch.empty((0, 2), dtype=torch.int64)
    if matcher == "snn":
        _, idx = KF.match_snn(desc1, desc2, ratio)
    elif matcher == "smnn":
        _, idx = KF.match_smnn(desc1, desc2, ratio)
    elif matcher == "mnn":
        _, idx = KF.match_mnn(desc1, desc2)
    else:
        raise ConfigError(f"unknown matcher {matcher!r}; valid: {', '.join(_MATCHERS)}")
    return idx.long()


def _pad(feats: list[LocalFeatures]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack feature sets: keypoints ``[K, M, 2]``, descriptors ``[K, M, 128]``, validity ``[K, M]``."""
    m = max(1, max(f.keypoints.shape[0] for f in feats))
    kps = torch.zeros((len(feats), m, 2))
    desc = torch.zeros((len(feats), m, 128))
    valid = torch.zeros((len(feats), m), dtype=torch.bool)
    for i, f in enumerate(feats):
        n = f.keypoints.shape[0]
        kps[i, :n], desc[i, :n], valid[i, :n] = f.keypoints, f.descriptors, True
    return kps, desc, valid


def match_many(
    query: LocalFeatures, candidates: list[LocalFeatures], *, matcher: str, ratio: float, chunk: int = 32
) -> list[torch.Tensor]:
    """Tentative correspondences of one query against many candidates, one distance batch per ``chunk``.

    The same rules as kornia's ``match_snn`` / ``match_mnn`` / ``match_smnn`` (L2 distances; Lowe's ratio test
    ``d1 / d2 <= ratio``, BMVC/IJCV 2004), computed for ``chunk`` candidates with one ``torch.cdist`` instead of
    one call per pair. Returns ``[M, 2]`` (query index, candidate index) per candidate.
    """
    if matcher not in _MATCHERS:
        raise ConfigError(f"unknown matcher {matcher!r}; valid: {', '.join(_MATCHERS)}")
    out: list[torch.Tensor] = []
    nq = query.descriptors.shape[0]
    for start in range(0, len(candidates), chunk):
        part = candidates[start : start + chunk]
        _, desc, valid = _pad(part)
        if nq < 2:
            out += [torch.empty((0, 2), dtype=torch.int64) for _ in part]
            continue
        dist = torch.cdist(query.descriptors[None].expand(len(part), -1, -1), desc)  # [k, Nq, M]
        dist = dist.masked_fill(~valid[:, None, :], float("inf"))
        d12, j12 = dist.topk(min(2, dist.shape[2]), dim=2, largest=False)  # query -> candidate
        nn12 = j12[..., 0]
        rows = torch.arange(nq)
        for i, f in enumerate(part):
            n = f.keypoints.shape[0]
            if n < 2:
                out.append(torch.empty((0, 2), dtype=torch.int64))
                continue
            keep = torch.ones(nq, dtype=torch.bool)
            if matcher in ("snn", "smnn"):
                keep &= d12[i, :, 0] / d12[i, :, 1] <= ratio
            if matcher in ("mnn", "smnn"):
                d21, j21 = dist[i, :, :n].topk(2, dim=0, largest=False)  # candidate -> query
                mutual = j21[0, nn12[i]] == rows
                keep &= mutual
                if matcher == "smnn":
                    keep &= (d21[0] / d21[1] <= ratio)[nn12[i]]
            out.append(torch.stack([rows[keep], nn12[i][keep]], 1))
    return out


@dataclass(frozen=True)
class MatchSettings:
    """How two local-feature sets are matched and verified; one value serves :func:`count_inliers` and the
    reranker, so their defaults cannot drift apart."""

    matcher: str = "snn"  # snn (Lowe's ratio test) | mnn (mutual nearest neighbours) | smnn (both)
    ratio: float = 0.8  # Lowe's ratio threshold (snn, smnn)
    model: str = "homography"  # the geometric model RANSAC fits (kornia.geometry.RANSAC names)
    threshold: float = 3.0  # RANSAC inlier threshold, pixels of the resized crops
    ransac: str = "batched"  # batched (our homography RANSAC) | kornia
    hypotheses: int = 512  # hypotheses per pair of the batched RANSAC
    max_iter: int = 5  # sampling batches of kornia's RANSAC

    def __post_init__(self) -> None:
        if self.matcher not in _MATCHERS:
            raise ConfigError(f"unknown matcher {self.matcher!r}; valid: {', '.join(_MATCHERS)}")
        if self.model not in _MODELS:
            raise ConfigError(f"unknown geometric model {self.model!r}; valid: {', '.join(_MODELS)}")
        if self.ransac not in _RANSACS:
            raise ConfigError(f"unknown ransac {self.ransac!r}; valid: {', '.join(_RANSACS)}")


def count_inliers(
    a: LocalFeatures, b: LocalFeatures, *, match: MatchSettings | None = None, seed: int | None = 0
) -> int:
    """RANSAC inlier count of the tentative matches between two feature sets (0 below the minimal sample).

    ``ransac="batched"`` (homography only) is :func:`ransac_homography_batch`; ``"kornia"`` (and every other
    ``model``) is ``kornia.geometry.RANSAC`` with its default sampling budget of ``max_iter`` batches.
    """
    m = match or MatchSettings()
    idx = match_descriptors(a.descriptors, b.descriptors, matcher=m.matcher, ratio=m.ratio)
    if idx.shape[0] < max(_MODELS[m.model] + 1, 5):
        return 0
    kp1, kp2 = a.keypoints[idx[:, 0]].double(), b.keypoints[idx[:, 1]].double()
    if m.ransac == "batched" and m.model == "homography":
        return ransac_homography_batch(
            [(kp1, kp2)], threshold=m.threshold, hypotheses=m.hypotheses, seed=seed
        )[0]
    estimator = kornia.geometry.RANSAC(m.model, inl_th=m.threshold, max_iter=m.max_iter, seed=seed)
    _, inliers = estimator(kp1, kp2)
    return int(inliers.sum())


class GeometricVerification(FeatureReranker):
    """Reorder the top-K of a global ranking by RANSAC inliers of SIFT matches (``geometric``).

    ``mode="inliers"`` (default, DELG GV): candidates with at least ``min_inliers`` inliers come first, by
    inlier count then global score; the rest follow by global score. Scores become
    ``global + 3 * (1 + inliers)`` for verified items (``global`` in [-1, 1], so the order above holds).
    ``mode="blend"``: ``global + blend_weight * min(inliers, inlier_cap) / inlier_cap`` for verified items, a
    softer mix for weak global features. ``topk`` (default 100) caps how many of the supplied columns are
    verified; the rest keep their order after them. ``num_features`` .. ``extractor`` are the fields of the
    :class:`LocalFeatureSettings` it builds (``extractor="auto"``: batched scale-space SIFT on CUDA, per-image SIFT
    on CPU) unless ``settings`` is given. ``match`` (a :class:`MatchSettings` or its fields as a mapping, e.g.
    ``{"ransac": "kornia", "threshold": 5.0}`` in a pipeline's reranker options) sets matching and RANSAC. The
    class itself is the registered ``geometric`` factory, so its defaults are stated once.
    """

    #: the inputs are prepared on the CPU: the inliers come from the images, not from the features
    device: str | None = "cpu"

    def __init__(
        self,
        *,
        topk: int = 100,
        min_inliers: int = 12,
        mode: str = "inliers",
        blend_weight: float = 0.5,
        inlier_cap: int = 50,
        match: MatchSettings | Mapping[str, Any] | None = None,
        num_features: int = 256,
        max_side: int = 256,
        margin: float = 0.05,
        upsample: bool = False,
        descriptor: str = "patch",
        extractor: str = "auto",
        settings: LocalFeatureSettings | None = None,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        if settings is None:  # the local-feature fields, flat so that `--rerank geometric` options reach them
            settings = LocalFeatureSettings(
                extractor=extractor,
                num_features=num_features,
                max_side=max_side,
                margin=margin,
                upsample=upsample,
                descriptor=descriptor,
            )
        if mode not in _MODES:
            raise ConfigError(f"unknown geometric mode {mode!r}; valid: {', '.join(_MODES)}")
        self.topk = topk
        self.min_inliers = min_inliers
        self.mode = mode
        self.blend_weight = blend_weight
        self.inlier_cap = inlier_cap
        self.match = match if isinstance(match, MatchSettings) else MatchSettings(**(match or {}))
        self.extractor = LocalFeatureExtractor(settings, cache_dir=cache_dir, device=device)
        self.progress = progress

    def inlier_matrix(
        self, ranking: np.ndarray, query_images: list[ImageRef], gallery_images: list[ImageRef]
    ) -> np.ndarray:
        """``[Q, K]`` inlier counts between each query and its ranked candidates.

        Features are extracted once per image (queries up front, gallery through the cache); each query is
        matched against all its candidates in one distance batch, and only pairs with at least
        ``max(min_inliers, 5)`` tentative matches go to RANSAC (fewer matches cannot give ``min_inliers``
        inliers, so skipping them changes no ranking; they report 0). With the batched homography RANSAC, the
        surviving pairs of a query are estimated together.
        """
        needed = sorted(set(ranking.reshape(-1).tolist()))
        gallery_feats = dict(
            zip(needed, self.extractor.extract([gallery_images[i] for i in needed], progress=self.progress))
        )
        query_feats = self.extractor.extract(list(query_images), progress=self.progress)
        out = np.zeros(ranking.shape, dtype=np.int64)
        threads = torch.get_num_threads()
        if self.extractor.cpu_threads:  # small per-query batches: one thread is faster on a busy CPU
            torch.set_num_threads(self.extractor.cpu_threads)
        try:
            self._verify(ranking, query_feats, gallery_feats, out)
        finally:
            torch.set_num_threads(threads)
        return out

    def _verify(
        self,
        ranking: np.ndarray,
        query_feats: list[LocalFeatures],
        gallery_feats: dict[int, LocalFeatures],
        out: np.ndarray,
    ) -> None:
        opts = self.match
        min_matches = max(self.min_inliers, _MODELS[opts.model] + 1, 5)
        batched = opts.ransac == "batched" and opts.model == "homography"
        for qi in tqdm(range(ranking.shape[0]), desc="geometric verification", disable=not self.progress):
            q_feats, cands = query_feats[qi], ranking[qi].tolist()
            idx = match_many(
                q_feats, [gallery_feats[gi] for gi in cands], matcher=opts.matcher, ratio=opts.ratio
            )
            cols = [j for j, m in enumerate(idx) if m.shape[0] >= min_matches]
            pairs = [
                (
                    q_feats.keypoints[idx[j][:, 0]].double(),
                    gallery_feats[cands[j]].keypoints[idx[j][:, 1]].double(),
                )
                for j in cols
            ]
            if batched:
                counts = ransac_homography_batch(
                    pairs, threshold=opts.threshold, hypotheses=opts.hypotheses, seed=qi
                )
            else:
                counts = [self._kornia_count(src, dst) for src, dst in pairs]
            out[qi, cols] = counts

    def _kornia_count(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        opts = self.match
        estimator = kornia.geometry.RANSAC(opts.model, inl_th=opts.threshold, max_iter=opts.max_iter, seed=0)
        _, inliers = estimator(src, dst)
        return int(inliers.sum())

    def rescore(self, scores: torch.Tensor, inliers: torch.Tensor) -> torch.Tensor:
        verified = inliers >= self.min_inliers
        if self.mode == "inliers":
            bonus = 3.0 * (1.0 + inliers.float())
        else:
            bonus = self.blend_weight * inliers.clamp(max=self.inlier_cap).float() / self.inlier_cap
        return scores + torch.where(verified, bonus, torch.zeros_like(bonus))

    def reorder(self, inp: RerankInputs) -> tuple[np.ndarray, np.ndarray]:
        """Verify the head of every row against its query's image and reorder it (see the class docstring)."""
        query_images, gallery_images = require_image_refs(inp, method="geometric")
        k = min(self.topk, inp.topk)
        head, head_scores = inp.ranking[:, :k], inp.scores[:, :k]
        inliers = torch.from_numpy(self.inlier_matrix(head.numpy(), query_images, gallery_images))
        new_rank, new_scores = sort_rows(head, self.rescore(head_scores, inliers))
        if k == inp.topk:
            return new_rank, new_scores

        full_rank, full_scores = append_tail(
            torch.from_numpy(new_rank), torch.from_numpy(new_scores), inp.ranking[:, k:], inp.scores[:, k:]
        )
        return full_rank.numpy(), full_scores.numpy()


register_reranker("geometric")(GeometricVerification)
