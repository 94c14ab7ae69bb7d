"""The query pipeline on a tiny model: index build (resumable, COCO detections), search, captions, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_text import save_tiny_dual_stream  # noqa: E402

import capret  # noqa: E402
from capret.cli.main import main  # noqa: E402
from capret.inference.detectors import CocoResultsDetector, Detection  # noqa: E402
from capret.inference.query.captioner import Captioner  # noqa: E402
from capret.inference.query.gallery import Gallery, build_gallery, finish_gallery  # noqa: E402
from capret.inference.query.pipeline import PipelineConfig, RetrievalPipeline  # noqa: E402
from captioning.backends import create_backend  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipe")
    save_tiny_dual_stream(root / "model", pad="squarepad")
    rng = np.random.default_rng(0)
    shop = root / "shop"
    shop.mkdir()
    for i in range(9):
        pixels = rng.integers(0, 255, size=(36 + 2 * i, 44, 3), dtype=np.uint8)
        pixels[5:25, 5:30] = (40 * i % 255, 200, 30)  # a coloured "garment"
        Image.fromarray(pixels).save(shop / f"{i + 1:06d}.png")
    return {"root": root, "model": root / "model", "shop": shop}


def _build(assets: dict[str, Path], out: Path, *args: str) -> int:
    argv = ["index", "build", "--checkpoint", str(assets["model"]), "--images", str(assets["shop"])]
    return main([*argv, "--out", str(out), "--shard-images", "4", "--no-progress", *args])


def test_index_build_then_search_finds_the_same_photo(assets: dict[str, Path], tmp_path: Path) -> None:
    assert _build(assets, tmp_path / "gallery", "--captions", "template") == 0
    gallery = Gallery(tmp_path / "gallery")
    assert len(gallery) == 9 and len(gallery.features.shards) == 3
    assert all(item["caption"] for item in gallery.items)
    PipelineConfig(model=str(assets["model"]), gallery="../gallery", captioner={"backend": "template"}).save(
        tmp_path / "pipe"
    )
    pipeline = capret.RetrievalPipeline.load(tmp_path / "pipe", device="cpu")
    query = assets["shop"] / "000005.png"
    result = pipeline.search_detailed(query, k=5)
    assert result.matches[0].gallery_id == "000005/0"  # the photo itself is its own nearest neighbour
    assert result.matches[0].score == pytest.approx(1.0, abs=1e-4)
    assert result.items[0].caption and result.matches[0].query_caption == result.items[0].caption
    assert set(result.timings) == {"detect", "caption", "embed", "search", "rerank", "total"}
    # the query caption is cached by pixels + box: a second search asks the backend nothing
    assert pipeline.captioner is not None
    pipeline.search(Image.open(query), k=5)
    assert pipeline.captioner.last_cache_hits == 1
    # image-only search differs from the captioned one, by id lookup finds neighbours other than itself
    image_only = pipeline.search_detailed(query, k=5, use_captions=False)
    assert image_only.items[0].caption is None and image_only.matches[0].query_caption is None
    by_id = pipeline.search_by_id("000005/0", k=3)
    assert len(by_id) == 3 and all(m.gallery_id != "000005/0" for m in by_id)
    pipeline.close()
    assert (tmp_path / "pipe" / "query_captions.jsonl").is_file()


def test_given_boxes_embed_like_the_model_crops(assets: dict[str, Path], tmp_path: Path) -> None:
    model = capret.load_model(assets["model"], device="cpu")
    path = assets["shop"] / "000002.png"
    box = (5.0, 5.0, 30.0, 25.0)
    got = model.encode_images([path], boxes=[box])
    # reference: the model's own transform applied to the crop, one image at a time
    pixels, _ = model.transform(Image.open(path).convert("RGB"), box)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.model.encode_image(pixels[None]), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_coco_results_detections_and_resume(assets: dict[str, Path], tmp_path: Path) -> None:
    results = []
    for image_id in range(1, 10):
        results.append({"image_id": image_id, "category_id": 1, "bbox": [5, 5, 25, 20], "score": 0.9})
        results.append({"image_id": image_id, "category_id": 7, "bbox": [0, 0, 44, 30], "score": 0.3})
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(results))
    detector = CocoResultsDetector(path=dets, score_threshold=0.5)
    assert detector.detect_files([assets["shop"] / "000003.png"]) == [
        [Detection(box=(5.0, 5.0, 30.0, 25.0), score=0.9, category_id=1)]
    ]
    model = capret.load_model(assets["model"], device="cpu")
    paths = sorted(assets["shop"].glob("*.png"))
    ids = [p.stem for p in paths]
    out = tmp_path / "gallery"
    common = {
        "images": paths,
        "ids": ids,
        "out": out,
        "detector": detector,
        "shard_images": 4,
        "progress": False,
    }
    build_gallery(model, **common)
    finish_gallery(out)
    full = Gallery(out).features.read_all()
    (out / "features" / "manifest.json").unlink()
    manifest = json.loads((out / "features" / "manifest_r0.json").read_text())
    manifest["shards"] = manifest["shards"][:1]  # ... as if killed after shard 0
    (out / "features" / "manifest_r0.json").write_text(json.dumps(manifest))
    summary = build_gallery(model, **common)
    assert summary["shards_skipped"] == 1 and summary["shards_written"] == 2 and summary["items"] == 9
    finish_gallery(out)
    gallery = Gallery(out)
    np.testing.assert_allclose(gallery.features.read_all(), full, atol=1e-6)
    assert gallery.items[0]["box"] == [5.0, 5.0, 30.0, 25.0] and gallery.items[0]["category_id"] == 1
    # a different job in the same folder is refused instead of mixing features
    with pytest.raises(ValueError, match="another build .*shard_images"):
        build_gallery(model, **{**common, "shard_images": 3})


def test_search_cli_json_picture_and_reranker(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build(assets, tmp_path / "pipe" / "gallery", "--index", "exact") == 0
    capsys.readouterr()
    PipelineConfig(
        model=str(assets["model"]),
        gallery="gallery",
        captioner={"backend": "template", "cache": None},
        reranker={"name": "aqe", "options": {"k": 2}, "topk": 6},
    ).save(tmp_path / "pipe")
    query = assets["shop"] / "000007.png"
    argv = ["search", "--pipeline", str(tmp_path / "pipe"), "--image", str(query), "--k", "4"]
    assert main([*argv, "--json", "--out", str(tmp_path / "pic.png"), "--box", "0,0,44,30"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["matches"]) == 4 and payload["items"][0]["box"] == [0.0, 0.0, 44.0, 30.0]
    assert payload["timings_ms"]["rerank"] > 0 and Path(payload["picture"]).is_file()
    scores = [m["score"] for m in payload["matches"]]
    assert scores == sorted(scores, reverse=True)
    assert main([*argv, "--no-rerank", "--no-captions"]) == 0
    table = capsys.readouterr().out
    assert "000007/0" in table and "rerank=0.0" in table
    assert (
        main(
            ["search", "--pipeline", str(tmp_path / "pipe"), "--gallery-id", "000003/0", "--k", "2", "--json"]
        )
        == 0
    )
    by_id = json.loads(capsys.readouterr().out)
    assert by_id["query"] == "000003/0" and len(by_id["matches"]) == 2
    assert all(m["gallery_id"] != "000003/0" for m in by_id["matches"])
    assert main(["search", "--pipeline", str(tmp_path / "pipe"), "--gallery-id", "nope/0"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["search", "--pipeline", str(tmp_path / "nowhere"), "--image", str(query)]) == 2
    assert "no pipeline.json" in capsys.readouterr().err


def test_pipeline_save_keeps_paths_valid(assets: dict[str, Path], tmp_path: Path) -> None:
    assert _build(assets, tmp_path / "a" / "gallery") == 0
    PipelineConfig(model=str(assets["model"]), gallery="gallery").save(tmp_path / "a")
    pipeline = RetrievalPipeline.load(tmp_path / "a", device="cpu")
    pipeline.save(tmp_path / "b")
    moved = RetrievalPipeline.load(tmp_path / "b", device="cpu")
    assert [m.gallery_id for m in moved.search(assets["shop"] / "000001.png", k=3)] == [
        m.gallery_id for m in pipeline.search(assets["shop"] / "000001.png", k=3)
    ]


def test_captioner_with_openai_backend_caches_per_box(tmp_path: Path) -> None:
    from capret.testing import ChatServer

    image = Image.new("RGB", (32, 24), (200, 10, 10))
    with ChatServer() as server:
        backend = create_backend("openai", base_urls=[server.base_url], vlm="tiny")
        captioner = Captioner(backend, cache=tmp_path / "c.jsonl")
        first = captioner.caption([image, image], [(0, 0, 16, 24), (16, 0, 32, 24)])
        assert all(first) and captioner.last_cache_hits == 0
        asked = server.requests
        again = captioner.caption([image], [(0, 0, 16, 24)])
        assert again == first[:1] and server.requests == asked and captioner.last_cache_hits == 1
        captioner.close()
    # the store persists: a new captioner reads it back
    reopened = Captioner(create_backend("template"), cache=tmp_path / "c.jsonl")
    assert reopened.caption([image], [(16, 0, 32, 24)]) == first[1:]
    reopened.close()


def test_ranks_split_the_gallery_and_merge_to_the_single_process_build(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    model = capret.load_model(assets["model"], device="cpu")
    paths = sorted(assets["shop"].glob("*.png"))
    ids = [p.stem for p in paths]
    common = {"images": paths, "ids": ids, "shard_images": 2, "progress": False}
    build_gallery(model, out=tmp_path / "one", **common)
    finish_gallery(tmp_path / "one")
    for rank in (1, 0):  # ranks finish in any order; the merge waits for every rank manifest
        build_gallery(model, out=tmp_path / "two", rank=rank, world_size=2, **common)
    finish_gallery(tmp_path / "two")
    one, two = Gallery(tmp_path / "one"), Gallery(tmp_path / "two")
    assert [s.rank for s in two.features.shards] == [0, 0, 0, 1, 1]
    order = [one.row_of(item["id"]) for item in two.items]
    assert sorted(order) == list(range(9))
    np.testing.assert_allclose(two.features.read_all(), one.features.read_all()[order], atol=1e-6)
    query = one.features.gather([3])
    assert [two.items[r]["id"] for r in two.search(query, 4)[1][0]] == [
        one.items[r]["id"] for r in one.search(query, 4)[1][0]
    ]


def test_capret_extract_output_opens_as_sharded_features(assets: dict[str, Path], tmp_path: Path) -> None:
    from capret.cli.extract import main as extract_main
    from capret.retrieval.sharded import open_features

    argv = [
        "--checkpoint",
        str(assets["model"]),
        "--images",
        str(assets["shop"]),
        "--out",
        str(tmp_path / "f"),
    ]
    assert extract_main([*argv, "--shard-size", "4", "--device", "cpu"]) == 0
    features = open_features(tmp_path / "f")
    assert features.rows == 9 and [s.rows for s in features.shards] == [4, 4, 1]
    assert [item["id"] for item in features.items()] == [f"{i:06d}" for i in range(1, 10)]
    expected = capret.load_model(assets["model"], device="cpu").encode_images(
        sorted(assets["shop"].glob("*.png"))
    )
    np.testing.assert_allclose(features.read_all(), expected, atol=1e-5)


def test_second_index_build_into_one_gallery_is_refused(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys
    import time

    from capret.locks import lock_path_for

    out = tmp_path / "gallery"
    argv = ["index", "build", "--checkpoint", str(assets["model"]), "--images", str(assets["shop"])]
    argv += ["--out", str(out), "--shard-images", "1", "--batch-size", "1", "--no-progress"]
    code = "import sys; from capret.cli.main import main; raise SystemExit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not lock_path_for(out).exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first build never took the lock"
            time.sleep(0.01)
        assert main([*argv, "--overwrite"]) == 2  # refused before --overwrite clears anything
        err = capsys.readouterr().err
        assert f"PID {first.pid}" in err and str(out) in err and err.count("\n") == 1
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
        first.wait()
    gallery = Gallery(out)
    assert len(gallery) == 9 and len(gallery.features.shards) == 9  # the first build, complete and alone
