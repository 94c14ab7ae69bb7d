"""The official DeepFashion2 protocol from raw images (``capret-eval --protocol deepfashion2 --checkpoint``).

The check of issue 12: with the ground-truth-box protocol's boxes given as detections (score 1, true class), the
detected path writes the same ranking as the ground-truth-box mode (``capret-eval --metric map --out``), so its
official top-k is *exactly* that mode's ``official_top{k}`` — without captions, and with template captions
generated per detection (the GT mode then reads the same captions from a store keyed by item).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_text import save_tiny_dual_stream, write_synthetic_df2  # noqa: E402

from capret.cli.eval import main  # noqa: E402
from capret.errors import DataError  # noqa: E402
from capret.inference.detectors import CocoResultsDetector  # noqa: E402
from capret.inference.dualstream.detected import detection_key, ground_truth_detections  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KS = ["1", "5", "10"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detected")
    write_synthetic_df2(root / "df2", identities={"validation": 12}, user_views=2, size=64)
    save_tiny_dual_stream(root / "model", mode="crop")
    dets = root / "gt_dets.json"
    dets.write_text(json.dumps(ground_truth_detections(root / "df2", "validation")))
    return {"root": root / "df2", "model": root / "model", "dets": dets, "tmp": root}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _gt_mode(
    assets: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str], captions: Path | None
) -> dict:
    argv = ["--metric", "map", "--checkpoint", str(assets["model"]), "--dataset", "deepfashion2"]
    argv += ["--root", str(assets["root"]), "--split", "validation", "--out", str(out), "--ks", *KS]
    argv += ["--captions", str(captions)] if captions else []
    return _run(argv, capsys)


def _detected(assets: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str], captions: str) -> dict:
    argv = ["--protocol", "deepfashion2", "--checkpoint", str(assets["model"]), "--root", str(assets["root"])]
    argv += ["--split", "validation", "--detections", str(assets["dets"]), "--captions", captions]
    argv += ["--caption-rounds", "1", "--out", str(out), "--ks", *KS]
    return _run(argv, capsys)


def _rankings(path: Path) -> list[tuple]:
    return [
        (r["query_image_id"], tuple(r["query_bbox"]), r["query_cls"], tuple(r["gallery_image_id"][:10]))
        for r in json.loads(path.read_text())
    ]


def test_gt_detections_reproduce_gt_box_mode(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gt = _gt_mode(assets, tmp_path / "gt", capsys, None)
    det = _detected(assets, tmp_path / "det", capsys, "none")
    assert det["query_detections"] == gt["num_queries"] == 24 and det["gallery_detections"] == 12
    for k in KS:
        assert det[f"top{k}"] == gt[f"official_top{k}"], k
    # Not only the scores: the written rankings are the same lists.
    assert _rankings(tmp_path / "det" / "results.json") == _rankings(tmp_path / "gt" / "results.json")
    assert 0.0 < det["top10"] <= 1.0 and det["missed"] == 0


def test_template_captions_per_detection_match_item_captions(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    det = _detected(assets, tmp_path / "det", capsys, "template")
    store = Path(det["caption_store"])
    records = [json.loads(line) for line in store.read_text().splitlines()]
    assert det["captions_missing"] == 0 and len(records) == 36  # 24 user + 12 shop detections, each once
    # The same captions under the items' keys: the GT-box mode must then rank identically.
    from capret.data.deepfashion2 import load_items

    by_box = {r["key"]: r for r in records}
    items_store = tmp_path / "items.jsonl"
    lines = []
    for it in load_items(assets["root"], "validation", progress=False):
        record = by_box[detection_key("validation", it.image_id, it.bbox)]
        lines.append(json.dumps({**record, "key": it.key}))
    items_store.write_text("\n".join(lines) + "\n")
    gt = _gt_mode(assets, tmp_path / "gt", capsys, items_store)
    for k in KS:
        assert det[f"top{k}"] == gt[f"official_top{k}"], k
    assert _rankings(tmp_path / "det" / "results.json") == _rankings(tmp_path / "gt" / "results.json")
    # A rerun reuses the cached captions (the store gains no line).
    _detected(assets, tmp_path / "det", capsys, "template")
    assert len(store.read_text().splitlines()) == 36


def test_rerank_reorders_the_head_of_each_ranking(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = _detected(assets, tmp_path / "plain", capsys, "none")
    argv = ["--protocol", "deepfashion2", "--checkpoint", str(assets["model"]), "--root", str(assets["root"])]
    argv += [
        "--detections",
        str(assets["dets"]),
        "--captions",
        "none",
        "--rerank",
        "aqe",
        "--rerank-topk",
        "5",
    ]
    out = _run([*argv, "--out", str(tmp_path / "aqe"), "--ks", *KS], capsys)
    assert out["rerank"] == "aqe" and plain["rerank"] is None
    before = json.loads((tmp_path / "plain" / "results.json").read_text())
    after = json.loads((tmp_path / "aqe" / "results.json").read_text())
    for b, a in zip(before, after):  # the top 5 are permuted, the rest stays
        assert sorted(a["gallery_image_id"][:5]) == sorted(b["gallery_image_id"][:5])
        assert a["gallery_image_id"][5:] == b["gallery_image_id"][5:]
    assert any(a["gallery_image_id"] != b["gallery_image_id"] for b, a in zip(before, after))


def test_trained_detector_folder_runs_the_protocol(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from capret.models.detector import ClothingDetector, DetectorModelConfig

    torch.manual_seed(0)
    model = ClothingDetector(
        DetectorModelConfig(backbone="mobilenet_v3_small", min_size=64, max_size=64, box_head_width=32)
    )
    model.save_pretrained(tmp_path / "detector")
    argv = ["--protocol", "deepfashion2", "--checkpoint", str(assets["model"]), "--root", str(assets["root"])]
    argv += ["--detector", str(tmp_path / "detector"), "--score-threshold", "0", "--max-items", "2"]
    argv += ["--captions", "none", "--out", str(tmp_path / "out"), "--ks", "1", "5"]
    out = _run(argv, capsys)
    assert out["query_detections"] <= 2 * out["query_images"] and out["gallery_detections"] >= 5
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(records) == out["query_detections"] and all(len(r["gallery_image_id"]) >= 5 for r in records)
    assert 0.0 <= out["top5"] <= 1.0


def test_sources_are_exclusive_and_checked(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--protocol", "deepfashion2", "--checkpoint", str(assets["model"]), "--root", str(assets["root"])]
    with pytest.raises(SystemExit):  # argparse: --results and --checkpoint exclude each other
        main([*base, "--results", "r.json"])
    assert main([*base, "--out", str(tmp_path)]) == 2  # no detector
    assert "--detector DIR" in capsys.readouterr().err
    assert main(["--protocol", "deepfashion2", "--detections", str(assets["dets"])]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_external_detections_are_validated(tmp_path: Path) -> None:
    bad = tmp_path / "dets.json"
    bad.write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}, {"image_id": 2}])
    )
    with pytest.raises(DataError, match="entry 1") as info:
        CocoResultsDetector(path=bad)
    assert str(bad) in str(info.value)
    good = tmp_path / "ok.json"
    entries = [
        {"image_id": 3, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.2},
        {"image_id": 3, "category_id": 5, "bbox": [0, 0, 10, 10], "score": 0.8},
    ]
    good.write_text(json.dumps(entries))
    found = CocoResultsDetector(path=good).detect_files([tmp_path / "000003.jpg", tmp_path / "000004.jpg"])
    assert [d.category_id for d in found[0]] == [5, 2] and found[1] == []
    assert np.allclose(found[0][1].box, (1, 2, 4, 6))  # xywh -> xyxy
