"""No silent result: out-of-range options, duplicate JSON keys, unknown versions, empty inputs, unscorable
evaluations and inconsistent result files end in one line naming the file, key or option (exit 2), never in a
NaN metric, a traceback or a quietly wrong answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_checks import expect_error  # noqa: E402
from tiny_text import save_tiny_dual_stream, write_synthetic_df2  # noqa: E402

from capret.cli import eval as eval_cli  # noqa: E402
from capret.cli import main as capret_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def expect_usage(capsys: pytest.CaptureFixture[str], main: object, argv: list[str], *needles: str) -> str:
    """argparse refuses the value before any work: exit 2, one ``error:`` line naming the option and value."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)  # type: ignore[operator]
    assert raised.value.code == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dual_stream(tmp_path_factory.mktemp("model") / "model", pad="squarepad")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, size=(30, 36, 3), dtype=np.uint8)).save(
            folder / f"{i + 1:06d}.png"
        )
    return folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, shop: Path) -> Path:
    from capret.inference.query.pipeline import PipelineConfig

    root = tmp_path_factory.mktemp("pipe")
    argv = ["index", "build", "--checkpoint", str(model_dir), "--images", str(shop), "--out",
            str(root / "gallery"), "--no-progress"]  # fmt: skip
    assert capret_cli.main(argv) == 0
    PipelineConfig(model=str(model_dir), gallery="../gallery", captioner=None).save(root / "pipeline")
    return root / "pipeline"


def test_numeric_options_validate_their_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serve = ["serve", "--pipeline", str(tmp_path)]
    expect_usage(capsys, capret_cli.main, [*serve, "--max-upload-mb", "-1"], "--max-upload-mb", "'-1'", "> 0")
    expect_usage(capsys, capret_cli.main, [*serve, "--max-upload-mb", "nan"], "--max-upload-mb", "'nan'")
    expect_usage(capsys, capret_cli.main, [*serve, "--host", "256.1.1.1"], "--host", "256.1.1.1")
    expect_usage(capsys, capret_cli.main, [*serve, "--port", "70000"], "--port", "70000")
    expect_usage(capsys, capret_cli.main, [*serve, "--max-concurrency", "0"], "--max-concurrency", "'0'")
    oti = ["oti", "--clip", "x", "--images", str(tmp_path), "--out", str(tmp_path / "t.safetensors")]
    expect_usage(capsys, capret_cli.main, [*oti, "--steps", "0"], "--steps", "'0'", ">= 1")
    expect_usage(capsys, capret_cli.main, [*oti, "--ema-decay", "1.5"], "--ema-decay", "[0, 1]")
    search = ["search", "--pipeline", str(tmp_path), "--gallery-id", "a/0"]
    expect_usage(capsys, capret_cli.main, [*search, "--k", "two"], "--k", "'two'")
    index = ["index", "build", "--checkpoint", "m", "--images", "i", "--out", "o"]
    expect_usage(capsys, capret_cli.main, [*index, "--shard-images", "-3"], "--shard-images")
    expect_usage(capsys, eval_cli.main, ["--metric", "map", "--ks", "0"], "--ks", "'0'")


def test_pipeline_json_refuses_duplicates_versions_and_bad_values(
    tmp_path: Path, pipeline_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = json.loads((pipeline_dir / "pipeline.json").read_text())
    folder = tmp_path / "pipe"
    folder.mkdir()
    path = folder / "pipeline.json"
    argv = ["search", "--pipeline", str(folder), "--gallery-id", "000001/0"]

    def write(**changes: object) -> None:
        path.write_text(json.dumps({**good, "gallery": str(pipeline_dir.parent / "gallery"), **changes}))

    write()
    assert capret_cli.main([*argv, "--json"]) == 0
    path.write_text(path.read_text()[:-1] + ', "max_items": 3, "max_items": 1}')
    expect_error(capsys, capret_cli.main, argv, "pipeline.json", "'max_items' twice")
    write(version=99)
    expect_error(capsys, capret_cli.main, argv, "pipeline.json", "unknown version 99")
    write(max_items=-1)
    expect_error(capsys, capret_cli.main, argv, "pipeline.json", "max_items", "-1")
    write(max_items="two")
    expect_error(capsys, capret_cli.main, argv, "pipeline.json", "max_items", "'two'")
    write(reranker={"name": "none", "topk": 0})
    expect_error(capsys, capret_cli.main, argv, "pipeline.json", "reranker.topk", "0")
    path.write_text(path.read_text().replace('"topk": 0', '"topk": NaN'))
    expect_error(capsys, capret_cli.main, argv, "pipeline.json", "NaN")
    gallery_json = pipeline_dir.parent / "gallery" / "gallery.json"
    saved = gallery_json.read_text()
    try:
        write()
        gallery_json.write_text(json.dumps({**json.loads(saved), "version": 7}))
        expect_error(capsys, capret_cli.main, argv, "gallery.json", "unknown version 7")
    finally:
        gallery_json.write_text(saved)


def test_search_out_folder_gets_the_picture_inside(
    tmp_path: Path, pipeline_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pictures"
    argv = ["search", "--pipeline", str(pipeline_dir), "--gallery-id", "000001/0", "--k", "2", "--json"]
    capsys.readouterr()
    assert capret_cli.main([*argv, "--out", str(out)]) == 0
    written = Path(json.loads(capsys.readouterr().out)["picture"])
    assert written == out / "search_000001_0.png" and written.is_file()
    assert not (tmp_path / "pictures.png").exists()
    assert capret_cli.main([*argv, "--out", str(tmp_path / "one.png")]) == 0
    assert Path(json.loads(capsys.readouterr().out)["picture"]) == tmp_path / "one.png"
    expect_error(capsys, capret_cli.main, [*argv, "--out", str(tmp_path / "x.jpg")], "--out", ".jpg")


def test_map_with_no_scorable_query_or_an_empty_gallery_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    files = {
        "query-features": rng.normal(size=(4, 8)).astype(np.float32),
        "gallery-features": rng.normal(size=(6, 8)).astype(np.float32),
        "query-labels": np.array([1, 2, 3, 4]),
        "gallery-labels": np.array([7, 7, 8, 8, 9, 9]),  # no query identity is in the gallery
    }
    argv = ["--metric", "map"]
    for name, array in files.items():
        np.save(tmp_path / f"{name}.npy", array)
        argv += [f"--{name}", str(tmp_path / f"{name}.npy")]
    expect_error(capsys, eval_cli.main, argv, "no query has a relevant gallery item", "mAP is undefined")
    np.save(tmp_path / "gallery-labels.npy", np.array([1, 7, 8, 8, 9, 9]))
    capsys.readouterr()
    assert eval_cli.main(argv) == 0  # one scorable query is enough (the others are counted as excluded)
    assert json.loads(capsys.readouterr().out)["num_excluded"] == 3
    np.save(tmp_path / "gallery-features.npy", np.zeros((0, 8), np.float32))
    np.save(tmp_path / "gallery-labels.npy", np.zeros(0, np.int64))
    expect_error(capsys, eval_cli.main, argv, "gallery_features holds no row")


def test_detections_without_score_are_refused(
    tmp_path: Path, model_dir: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]))
    argv = ["index", "build", "--checkpoint", str(model_dir), "--images", str(shop), "--out",
            str(tmp_path / "g"), "--detections", str(dets), "--no-progress"]  # fmt: skip
    expect_error(capsys, capret_cli.main, argv, "dets.json", "entry 0", "score")
    dets.write_text('[{"image_id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 1}]')
    expect_error(capsys, capret_cli.main, argv, "dets.json", "'image_id' twice")


def _results_case(tmp_path: Path) -> tuple[list[str], list[dict[str, object]]]:
    query_gt = [{"query_image_id": 1, "bbox": [0, 0, 10, 10], "cls": 1, "style": 1, "pair_id": 1},
                {"query_image_id": 2, "bbox": [0, 0, 10, 10], "cls": 1, "style": 1, "pair_id": 2}]  # fmt: skip
    gallery_gt = [{"gallery_image_id": 10, "bbox": [0, 0, 10, 10], "style": 1, "pair_id": 1},
                  {"gallery_image_id": 20, "bbox": [0, 0, 10, 10], "style": 1, "pair_id": 2}]  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(query_gt))
    (tmp_path / "g.json").write_text(json.dumps(gallery_gt))
    results = [
        {"query_image_id": q, "query_bbox": [0, 0, 10, 10], "query_score": 1.0, "query_cls": 1,
         "gallery_image_id": [10 * q, 30 - 10 * q], "gallery_bbox": [[0, 0, 10, 10], [0, 0, 10, 10]]}
        for q in (1, 2)
    ]  # fmt: skip
    argv = ["--protocol", "deepfashion2", "--results", str(tmp_path / "r.json"), "--query-gt",
            str(tmp_path / "q.json"), "--gallery-gt", str(tmp_path / "g.json"), "--ks", "1", "2"]  # fmt: skip
    return argv, results


def test_results_file_with_repeated_queries_or_unknown_gallery_ids_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, results = _results_case(tmp_path)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    capsys.readouterr()
    assert eval_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == 1.0
    path.write_text(json.dumps([*results, results[0]]))
    expect_error(capsys, eval_cli.main, argv, "r.json", "record 2 repeats record 0")
    path.write_text(json.dumps([results[0], {**results[1], "gallery_image_id": [20, 99]}]))
    expect_error(capsys, eval_cli.main, argv, "r.json", "record 1", "gallery_image_id[1] = 99", "gallery_gt")


def test_check_data_reports_duplicate_json_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "df2"
    write_synthetic_df2(root, identities={"train": 2, "validation": 2}, size=40)
    anno = sorted((root / "validation" / "annos").glob("*.json"))[0]
    text = anno.read_text()
    source = json.loads(text)["source"]
    anno.write_text(text.replace(f'"source": "{source}"', f'"source": "{source}", "source": "shop"', 1))
    assert '"source"' in anno.read_text() and anno.read_text().count('"source"') == 2
    capsys.readouterr()
    code = capret_cli.main(["check-data", "--dataset", "deepfashion2", "--root", str(root), "--split",
                            "validation", "--no-images"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1, out
    assert anno.name in out and "'source' twice" in out


def test_caption_numeric_settings_validate_their_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from captioning import cli as caption_cli

    out = tmp_path / "c.jsonl"
    argv = ["--dataset", "demo", "--root", str(tmp_path), "--out", str(out), "--backend", "openai", "--base-url",
            "http://127.0.0.1:9/v1", "--vlm", "m", "--no-progress"]  # fmt: skip
    for option, value, needle in (("--batch-size", "0", ">= 1"), ("--concurrency", "-1", ">= 1"),
                                  ("--timeout", "nan", "> 0"), ("--max-retries", "-1", ">= 0"),
                                  ("--temperature", "inf", "finite")):  # fmt: skip
        expect_error(capsys, caption_cli.main, [*argv, option, value], option, needle)
    assert not out.exists()
