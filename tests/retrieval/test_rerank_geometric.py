"""Geometric verification on real photographs (scikit-image's bundled images): a photo and its known homography
warp verify with many inliers, unrelated photos with few; box crops, the on-disk cache and the reranking order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data, transform

from capret.retrieval.rerank import create_reranker
from capret.retrieval.rerank.geometric import (
    MIN_SIDE,
    LocalFeatureExtractor,
    LocalFeatureSettings,
    MatchSettings,
    count_inliers,
    load_crop,
    match_descriptors,
    match_many,
    ransac_homography_batch,
)

_H = np.array([[0.92, 0.12, 12.0], [-0.06, 1.02, 6.0], [3e-4, 2e-4, 1.0]])


def _save(image: np.ndarray, path: Path) -> str:
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=95)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("photos")
    astronaut = transform.resize(data.astronaut(), (256, 256), anti_aliasing=True)
    warped = transform.warp(astronaut, np.linalg.inv(_H), output_shape=(256, 256))
    out = {
        "astronaut": _save(astronaut, root / "astronaut.jpg"),
        "astronaut_warped": _save(warped, root / "astronaut_warped.jpg"),
        "coffee": _save(transform.resize(data.coffee(), (200, 266), anti_aliasing=True), root / "coffee.jpg"),
        "chelsea": _save(
            transform.resize(data.chelsea(), (200, 300), anti_aliasing=True), root / "chelsea.jpg"
        ),
        "rocket": _save(transform.resize(data.rocket(), (256, 170), anti_aliasing=True), root / "rocket.jpg"),
    }
    # the astronaut pasted at an offset inside a larger canvas: its box must be honoured
    canvas = np.full((320, 400, 3), 0.9)
    canvas[40:296, 100:356] = astronaut
    out["astronaut_in_canvas"] = _save(canvas, root / "canvas.jpg")
    return out


def test_homography_warp_has_many_inliers_unrelated_photos_few(photos: dict[str, str]) -> None:
    extractor = LocalFeatureExtractor(LocalFeatureSettings(extractor="sift"), device="cpu")
    names = ["astronaut", "astronaut_warped", "coffee", "chelsea", "rocket"]
    feats = dict(zip(names, extractor.extract([(photos[n], None) for n in names])))
    same = count_inliers(feats["astronaut"], feats["astronaut_warped"])
    unrelated = [count_inliers(feats["astronaut"], feats[n]) for n in ("coffee", "chelsea", "rocket")]
    unrelated += [count_inliers(feats["coffee"], feats["chelsea"])]
    assert same >= 60, same
    assert max(unrelated) <= 10, unrelated
    for model in ("affine", "fundamental"):
        assert (
            count_inliers(feats["astronaut"], feats["astronaut_warped"], match=MatchSettings(model=model))
            >= 40
        )


def test_box_crop_and_cache(photos: dict[str, str], tmp_path: Path) -> None:
    ref = (photos["astronaut_in_canvas"], [100.0, 40.0, 356.0, 296.0])
    crop = load_crop(ref, margin=0.0, max_side=256)
    assert crop.shape == (1, 1, 256, 256)
    small = load_crop(ref, margin=0.1, max_side=128)
    assert max(small.shape[2:]) == 128
    settings = LocalFeatureSettings(extractor="sift", num_features=256)
    extractor = LocalFeatureExtractor(settings, cache_dir=tmp_path, device="cpu")
    first = extractor.extract([ref])[0]
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1
    fresh = LocalFeatureExtractor(settings, cache_dir=tmp_path, device="cpu")
    fresh._sift = None  # type: ignore[assignment]  # a cache hit must not need the extractor
    again = fresh.extract([ref])[0]
    assert np.allclose(first.keypoints.numpy(), again.keypoints.numpy())
    assert np.allclose(first.descriptors.numpy(), again.descriptors.numpy(), atol=1e-3)
    # other settings or another box are other cache entries
    LocalFeatureExtractor(
        LocalFeatureSettings(extractor="sift", num_features=128), cache_dir=tmp_path
    ).extract([ref])
    LocalFeatureExtractor(settings, cache_dir=tmp_path).extract([(ref[0], [90.0, 30.0, 366.0, 306.0])])
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    full = LocalFeatureExtractor(settings, device="cpu").extract([(photos["astronaut"], None)])[0]
    assert count_inliers(first, full) >= 60


def test_missing_image_and_bad_box_are_named(tmp_path: Path, photos: dict[str, str]) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_crop((str(tmp_path / "nope.jpg"), None), margin=0.0, max_side=64)
    with pytest.raises(ValueError, match="x2 > x1"):
        load_crop((photos["coffee"], [50, 10, 20, 40]), margin=0.0, max_side=64)


def test_geometric_rerank_moves_the_verified_match_to_the_top(photos: dict[str, str], tmp_path: Path) -> None:
    gallery_names = ["coffee", "chelsea", "astronaut", "rocket"]
    gallery = [(photos[n], None) for n in gallery_names]
    queries = [(photos["astronaut_warped"], None), (photos["astronaut_in_canvas"], [100, 40, 356, 296])]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 8)).astype(np.float32)
    g = rng.standard_normal((4, 8)).astype(np.float32)
    ranking = np.array(
        [[0, 1, 3, 2], [1, 0, 2, 3]]
    )  # the true match (2) is ranked low by the global features
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]], dtype=np.float32)
    reranker = create_reranker("geometric", cache_dir=str(tmp_path), progress=False, extractor="sift")
    new_rank, new_scores = reranker.rerank(
        ranking=ranking,
        scores=scores,
        query_features=q,
        gallery_features=g,
        query_images=queries,
        gallery_images=gallery,
    )
    assert new_rank[:, 0].tolist() == [2, 2]
    # unverified items keep their global order behind the verified one
    assert new_rank[0, 1:].tolist() == [0, 1, 3] and new_rank[1, 1:].tolist() == [1, 0, 3]
    assert (np.diff(new_scores, axis=1) <= 0).all()
    blend = create_reranker(
        "geometric", mode="blend", cache_dir=str(tmp_path), progress=False, extractor="sift"
    )
    b_rank, _ = blend.rerank(
        ranking=ranking,
        scores=scores,
        query_features=q,
        gallery_features=g,
        query_images=queries,
        gallery_images=gallery,
    )
    assert b_rank[:, 0].tolist() == [2, 2]
    with pytest.raises(ValueError, match="query_images and gallery_images"):
        reranker.rerank(ranking=ranking, scores=scores, query_features=q, gallery_features=g)


def test_batched_matching_equals_kornia_matchers(photos: dict[str, str]) -> None:
    extractor = LocalFeatureExtractor(LocalFeatureSettings(extractor="sift", num_features=256), device="cpu")
    names = ["astronaut", "astronaut_warped", "coffee", "rocket"]
    feats = extractor.extract([(photos[n], None) for n in names])
    for matcher in ("snn", "mnn", "smnn"):
        batched = match_many(feats[0], feats[1:], matcher=matcher, ratio=0.8)
        for cand, got in zip(feats[1:], batched):
            want = match_descriptors(feats[0].descriptors, cand.descriptors, matcher=matcher, ratio=0.8)
            assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist())), matcher


def test_batched_ransac_agrees_with_kornia_ransac(photos: dict[str, str]) -> None:
    extractor = LocalFeatureExtractor(LocalFeatureSettings(extractor="sift"), device="cpu")
    names = ["astronaut", "astronaut_warped", "coffee", "chelsea"]
    feats = dict(zip(names, extractor.extract([(photos[n], None) for n in names])))
    for other in ("astronaut_warped", "coffee", "chelsea"):
        ours = count_inliers(feats["astronaut"], feats[other], match=MatchSettings(ransac="batched"))
        ref = count_inliers(feats["astronaut"], feats[other], match=MatchSettings(ransac="kornia"))
        assert abs(ours - ref) <= max(3, 0.1 * ref), (other, ours, ref)
    # a known homography under 70% random outliers: the batched RANSAC recovers (nearly) all true inliers
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 256, (60, 2))
    dst = transform.ProjectiveTransform(matrix=_H)(src)
    out_src, out_dst = rng.uniform(0, 256, (140, 2)), rng.uniform(0, 256, (140, 2))
    pairs = [
        (torch.from_numpy(np.concatenate([src, out_src])), torch.from_numpy(np.concatenate([dst, out_dst]))),
        (torch.from_numpy(out_src), torch.from_numpy(out_dst)),
    ]
    counts = ransac_homography_batch(pairs, threshold=3.0, hypotheses=2048)
    assert 60 <= counts[0] <= 64 and counts[1] <= 8, counts


def test_tiny_images_are_upsampled_not_fatal(photos: dict[str, str], tmp_path: Path) -> None:
    """A 24x40 placeholder (CIR test data) used to break SIFT's pyramid; it is upsampled to MIN_SIDE now."""
    tiny = tmp_path / "tiny.png"
    Image.open(photos[next(iter(photos))]).convert("RGB").resize((24, 40)).save(tiny)
    crop = load_crop((str(tiny), None), margin=0.0, max_side=256)
    assert min(crop.shape[-2:]) == MIN_SIDE
    extractor = LocalFeatureExtractor(LocalFeatureSettings(extractor="sift", num_features=64), device="cpu")
    feats = extractor.extract([(str(tiny), None), (str(tiny), [2, 2, 20, 30])])
    assert all(f.keypoints.shape[1] == 2 for f in feats)


def test_geometric_checks_inputs_with_the_shared_helpers() -> None:
    """Features through ``prepare_inputs``, image references through ``require_image_refs``."""
    from capret.retrieval.rerank.geometric import GeometricVerification

    geo = GeometricVerification(progress=False)
    feats = {"query_features": [[1.0, 0.0]], "gallery_features": [[1.0, 0.0], [0.0, 1.0]]}
    refs = {"query_images": [("q.jpg", None)], "gallery_images": [("a.jpg", None), ("b.jpg", None)]}
    with pytest.raises(ValueError, match="outside \\[0, 2\\)"):
        geo.rerank(ranking=[[0, 2]], scores=[[1.0, 0.5]], **feats, **refs)
    with pytest.raises(ValueError, match="geometric reranking needs query_images"):
        geo.rerank(ranking=[[0, 1]], scores=[[1.0, 0.5]], **feats)
    with pytest.raises(ValueError, match="1 query / 1 gallery image refs for 1 queries / 2 gallery items"):
        geo.rerank(ranking=[[0, 1]], scores=[[1.0, 0.5]], **feats, query_images=refs["query_images"],
                   gallery_images=refs["gallery_images"][:1])  # fmt: skip


def test_match_settings_come_as_one_value_or_a_mapping() -> None:
    from capret.errors import ConfigError
    from capret.retrieval.rerank.geometric import GeometricVerification

    assert GeometricVerification(progress=False).match == MatchSettings()
    geo = GeometricVerification(progress=False, match={"ransac": "kornia", "threshold": 5.0})
    assert geo.match == MatchSettings(ransac="kornia", threshold=5.0)
    with pytest.raises(ConfigError, match="unknown matcher 'nn'; valid: snn"):
        GeometricVerification(progress=False, match={"matcher": "nn"})
