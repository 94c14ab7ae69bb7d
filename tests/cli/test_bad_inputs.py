"""Every console script on bad input: one line naming the file, field or value, a non-zero exit, no traceback.

Each case calls a script's ``main(argv)`` the way a new user would get it wrong (corrupt/truncated/empty images,
non-UTF-8 or truncated JSON, annotation items with missing or mistyped fields, results of the wrong shape,
unknown or mistyped config keys, duplicate YAML keys, missing roots, checkpoints missing files or with wrong
shapes, a caption store of another split) and checks the exit code and the one line on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_checks import expect_error  # noqa: E402
from tiny_text import save_tiny_dual_stream, write_synthetic_df2  # noqa: E402

from capret.cli import eval as eval_cli  # noqa: E402
from capret.cli import extract as extract_cli  # noqa: E402
from capret.cli import main as capret_cli  # noqa: E402
from capret.cli import train as train_cli  # noqa: E402
from captioning import cli as caption_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def df2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("df2")
    write_synthetic_df2(root, identities={"train": 3, "validation": 3}, size=48)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:

    root = tmp_path_factory.mktemp("model")
    save_tiny_dual_stream(root / "model", pad="squarepad")
    return root / "model"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (30 + i, 20), (40 * i, 90, 160)).save(folder / f"ok{i}.png")
    return folder


def _record(key: str, **extra: object) -> str:
    record = {"key": key, "caption": "a top", "dialogue": [], "backend": "t", "model": {}, "prompt_version": "v",
              "created": "2024-01-01T00:00:00", **extra}  # fmt: skip
    return json.dumps(record)


# ------------------------------------------------------------------------------------------------ configs


def test_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    expect_error(
        capsys, train_cli.main, ["--config", str(tmp_path / "none.yaml")], "none.yaml", "does not exist"
    )
    cfg.write_text("task: dualstream\ndata:\n  root: [unclosed\n")
    expect_error(capsys, train_cli.main, ["--config", str(cfg)], "c.yaml", "invalid YAML at line 4")
    cfg.write_text("task: dualstream\ndata:\n  root: a\n  root: b\n")
    expect_error(capsys, train_cli.main, ["--config", str(cfg)], "c.yaml", "duplicate key 'root'", "line 4")
    cfg.write_bytes(b"task: dualstream\nname: caf\xe9\n")
    expect_error(capsys, train_cli.main, ["--config", str(cfg)], "c.yaml", "not UTF-8")
    cfg.write_text("task: dualstream\ndata:\n  rooot: x\n")
    expect_error(capsys, train_cli.main, ["--config", str(cfg)], "c.yaml", "rooot", "valid keys")
    cfg.write_text("task: dualstream\n")
    expect_error(
        capsys, train_cli.main, ["--config", str(cfg), "trainer.max_steps=fast"], "trainer.max_steps", "fast"
    )
    expect_error(capsys, caption_cli.main, ["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.jsonl")],
                 "nowhere", "does not exist")  # fmt: skip


def test_debug_flag_and_environment_show_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--config", str(tmp_path / "none.yaml")]
    assert train_cli.main([*argv, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("CAPRET_DEBUG", "1")
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error:")


# ------------------------------------------------------------------------------------------------ evaluation


def _protocol_files(tmp_path: Path, df2: Path) -> dict[str, Path]:
    from capret.data.deepfashion2 import build_retrieval_ground_truth, load_items

    query, gallery = build_retrieval_ground_truth(load_items(df2, "validation", progress=False))
    files = {"q": tmp_path / "query_gt.json", "g": tmp_path / "gallery_gt.json"}
    files["q"].write_text(json.dumps(query))
    files["g"].write_text(json.dumps(gallery))
    results = [
        {"query_image_id": q["query_image_id"], "query_bbox": q["bbox"], "query_cls": q["cls"], "query_score": 1.0,
         "gallery_image_id": [g["gallery_image_id"] for g in gallery][:1] * 20,
         "gallery_bbox": [gallery[0]["bbox"]] * 20}
        for q in query
    ]  # fmt: skip
    files["r"] = tmp_path / "results.json"
    files["r"].write_text(json.dumps(results))
    return files


def test_eval_official_protocol_bad_files(
    tmp_path: Path, df2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = _protocol_files(tmp_path, df2)
    argv = ["--protocol", "deepfashion2", "--query-gt", str(f["q"]), "--gallery-gt", str(f["g"])]
    assert eval_cli.main([*argv, "--results", str(f["r"])]) == 0  # the well-formed file scores
    text = f["r"].read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(text[: len(text) // 2])  # truncated
    expect_error(
        capsys, eval_cli.main, [*argv, "--results", str(bad)], "bad.json", "not valid JSON", "line 1"
    )
    bad.write_bytes(b'[{"query_image_id": "\xff"}]')
    expect_error(capsys, eval_cli.main, [*argv, "--results", str(bad)], "bad.json", "not UTF-8")
    bad.write_text(json.dumps({"results": json.loads(text)}))  # wrong shape
    expect_error(capsys, eval_cli.main, [*argv, "--results", str(bad)], "bad.json", "list")
    records = json.loads(text)
    records[1]["query_bbox"] = [1, 2, None, 4]
    bad.write_text(json.dumps(records))
    expect_error(capsys, eval_cli.main, [*argv, "--results", str(bad)], "query_bbox", "[1, 2]")
    records = json.loads(text)
    del records[0]["query_score"]
    bad.write_text(json.dumps(records))
    expect_error(capsys, eval_cli.main, [*argv, "--results", str(bad)], "record 0", "query_score")
    bad.write_text(text.replace("1.0", "NaN", 1))  # NaN score: json accepts it, we do not
    expect_error(capsys, eval_cli.main, [*argv, "--results", str(bad)], "bad.json", "NaN")
    records = json.loads(text)
    records[0]["gallery_bbox"][0] = [float("nan")] * 4  # as a list passed in memory would be: checked too
    from capret.errors import NonFiniteError
    from capret.evaluation.deepfashion2 import evaluate_retrieval_results

    with pytest.raises(NonFiniteError, match=r"gallery_bbox\[0\]"):
        evaluate_retrieval_results(records, query_gt=f["q"], gallery_gt=f["g"])
    gt = json.loads(f["g"].read_text())
    gt[0]["bbox"] = [0, 0, "Infinity", 4]
    f["g"].write_text(json.dumps(gt).replace('"Infinity"', "Infinity"))
    expect_error(capsys, eval_cli.main, [*argv, "--results", str(f["r"])], "gallery_gt.json", "Infinity")


def test_eval_features_non_finite_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    q[3, 2] = np.nan
    paths = {}
    for name, array in (("q", q), ("g", g), ("ql", np.arange(5) % 3), ("gl", np.arange(6) % 3)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array)
    argv = ["--metric", "map", "--query-features", str(paths["q"]), "--gallery-features", str(paths["g"]),
            "--query-labels", str(paths["ql"]), "--gallery-labels", str(paths["gl"])]  # fmt: skip
    for index in ("exact", "flat"):
        expect_error(capsys, eval_cli.main, [*argv, "--index", index], "nan", "[3, 2]")
    q[3, 2], g[1, 0] = 0.0, np.inf
    np.save(paths["q"], q)
    np.save(paths["g"], g)
    expect_error(capsys, eval_cli.main, [*argv, "--rerank", "aqe"], "gallery_features", "inf", "[1, 0]")
    gone = [a if a != str(paths["g"]) else str(tmp_path / "gone.npy") for a in argv]
    expect_error(capsys, eval_cli.main, gone, "gone.npy")


def test_eval_checkpoint_refuses_a_store_of_another_split(
    tmp_path: Path, df2: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_store = tmp_path / "captions.train.jsonl"
    assert (
        caption_cli.main(["--root", str(df2), "--split", "train", "--out", str(train_store), "--no-progress"])
        == 0
    )
    base = [
        "--metric",
        "map",
        "--checkpoint",
        str(model_dir),
        "--dataset",
        "deepfashion2",
        "--root",
        str(df2),
    ]
    expect_error(capsys, eval_cli.main, [*base, "--split", "validation", "--captions", str(train_store)],
                 "captions.train.jsonl", "split 'train'", "'validation'")  # fmt: skip
    expect_error(
        capsys, eval_cli.main, [*base[:-1], str(tmp_path / "nodata"), "--split", "validation"], "nodata"
    )
    # a corrupt image: the default policy names it
    victim = df2 / "validation" / "image" / "000002.jpg"
    saved = victim.read_bytes()
    try:
        victim.write_bytes(saved[:40])
        expect_error(capsys, eval_cli.main, [*base, "--split", "validation"], "000002.jpg", "cannot decode")
    finally:
        victim.write_bytes(saved)


# ------------------------------------------------------------------------------------------------ extraction


def test_extract_bad_images_stores_and_checkpoints(
    tmp_path: Path, images: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--checkpoint", str(model_dir), "--images", str(images), "--out", str(tmp_path / "out")]
    (images / "empty.png").write_bytes(b"")
    expect_error(capsys, extract_cli.main, argv, "empty.png", "cannot decode")
    data = (images / "ok0.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "text.jpg").write_text("not an image")
    assert extract_cli.main([*argv, "--on-bad-image", "skip"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    skipped = manifest["skipped_images"]
    assert skipped["count"] == 3 and {Path(s["file"]).name for s in skipped["files"]} == {
        "empty.png", "truncated.png", "text.jpg"}  # fmt: skip
    assert manifest["rows"] == 4
    for name in ("empty.png", "truncated.png", "text.jpg"):
        (images / name).unlink()
    # caption stores: mistyped field (with its line), a store that joins nothing
    store = tmp_path / "c.jsonl"
    store.write_text(_record("ok0") + "\n" + _record("ok1").replace('"a top"', "123") + "\n")
    with_store = [*argv, "--captions", str(store), "--overwrite"]
    expect_error(capsys, extract_cli.main, with_store, "c.jsonl:2", "'caption'", "int")
    store.write_text(_record("deepfashion2/000001/1") + "\n")
    expect_error(capsys, extract_cli.main, with_store, "c.jsonl", "0 of 4", "coverage")
    # checkpoints: a truncated weights file, a missing one, a wrong shape
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    bad_ckpt = [a if a != str(model_dir) else str(broken) for a in argv]
    expect_error(
        capsys, extract_cli.main, [*bad_ckpt, "--overwrite"], "model.safetensors", "truncated or corrupt"
    )
    weights.unlink()
    expect_error(capsys, extract_cli.main, [*bad_ckpt, "--overwrite"], "model.safetensors", "does not exist")
    shutil.copy(model_dir / "model.safetensors", weights)
    meta = json.loads((broken / "capret_model.json").read_text())
    meta["config"]["embed_dim"] = 12
    (broken / "capret_model.json").write_text(json.dumps(meta))
    expect_error(capsys, extract_cli.main, [*bad_ckpt, "--overwrite"], "model.safetensors", "shape", "[24")
    expect_error(capsys, extract_cli.main, [*argv[:3], str(tmp_path / "none"), *argv[4:]], "none")


def test_encode_images_rejects_a_single_path(model_dir: Path) -> None:
    import capret

    model = capret.load_model(model_dir)
    with pytest.raises(TypeError, match=r"single path 'a\.png'.*\['a\.png'\]"):
        model.encode_images("a.png")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ captioning


def test_caption_store_problems(tmp_path: Path, df2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.jsonl"
    argv = ["--root", str(df2), "--out", str(out), "--no-progress"]
    out.write_text(_record("deepfashion2/000001/1").replace('"a top"', "123") + "\n")
    expect_error(capsys, caption_cli.main, argv, "c.jsonl:1", "'caption'", "must be str")
    # a duplicate key names a command that works
    out.write_text(_record("deepfashion2/000001/1") + "\n" + _record("deepfashion2/000001/1") + "\n")
    line = expect_error(capsys, caption_cli.main, argv, "c.jsonl", "lines 1 and 2")
    command = line.split("with: ", 1)[1].split()
    assert command[:2] == ["capret-caption", "--repair"]
    assert caption_cli.main(command[1:]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "kept": 1, "dropped": 1}
    # a valid last record without its newline is kept, and the run completes the rest
    out.write_text(_record("deepfashion2/000001/1"))
    assert caption_cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == 1 and summary["truncated_tail_bytes"] == 0
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["caption"] == "a top" and len(lines) == summary["total"]
    # the store now belongs to validation: captioning train into it is refused
    expect_error(
        capsys, caption_cli.main, [*argv, "--split", "train"], "c.jsonl", "split 'validation'", "'train'"
    )


def test_cirr_split_entry_outside_the_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cirr"
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    triplet = {
        "pairid": 1,
        "reference": "a",
        "caption": "x",
        "target_hard": "b",
        "img_set": {"id": 1, "members": ["b"]},
    }
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps([triplet]))
    (root / "image_splits" / "split.rc2.val.json").write_text(
        json.dumps({"a": "./dev/a.png", "b": "../../etc/passwd"})
    )
    argv = ["--dataset", "cirr", "--root", str(root), "--out", str(tmp_path / "c.jsonl"), "--no-progress"]
    expect_error(capsys, caption_cli.main, argv, "split.rc2.val.json", "'b'", "outside")


# ------------------------------------------------------------------------------------------------ check-data


def test_check_data_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "df2"
    write_synthetic_df2(root, identities={"validation": 3}, size=48)
    annos, pics = root / "validation" / "annos", root / "validation" / "image"
    argv = ["check-data", "--dataset", "deepfashion2", "--root", str(root), "--split", "validation"]
    assert capret_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["problem_count"] == 0
    pics.joinpath("000002.jpg").write_bytes(pics.joinpath("000002.jpg").read_bytes()[:50])
    anno = json.loads(annos.joinpath("000003.json").read_text())
    anno["item1"]["bounding_box"] = [0, 0, 400, 10]
    annos.joinpath("000003.json").write_text(json.dumps(anno))
    anno = json.loads(annos.joinpath("000004.json").read_text())
    anno["item1"]["style"] = "1"
    annos.joinpath("000004.json").write_text(json.dumps(anno))
    annos.joinpath("000005.json").write_text(
        json.dumps(anno).replace('"bounding_box": [', '"bounding_box": [NaN, ')
    )
    annos.joinpath("000006.json").write_bytes(b"{\xff")
    assert capret_cli.main(argv) == 1
    report = json.loads(capsys.readouterr().out)
    found = {(Path(p["file"]).name, p["field"]) for p in report["problems"]}
    assert found == {
        ("000002.jpg", "image"),
        ("000003.json", "item1.bounding_box"),
        ("000004.json", "item1.style"),
        ("000005.json", "annotation"),
        ("000006.json", "annotation"),
    }, report["problems"]
    assert report["problem_count"] == 5
    expect_error(
        capsys, capret_cli.main, [*argv[:4], str(tmp_path / "nope"), *argv[5:]], "nope", "does not exist"
    )


# ------------------------------------------------------------------------------------------------ skip policy


def test_skip_policy_in_training_batches_and_evaluation(tmp_path: Path, model_dir: Path) -> None:
    import capret
    from capret.data.deepfashion2 import load_items
    from capret.data.items import ItemCollator, ItemDataset, identity_labels
    from capret.errors import BadImageError
    from capret.inference.dualstream.encoding import evaluate_items, item_transform

    root = tmp_path / "df2"
    write_synthetic_df2(root, identities={"validation": 3}, size=48)
    broken = root / "validation" / "image" / "000002.jpg"
    broken.write_bytes(broken.read_bytes()[:60])
    model = capret.load_model(model_dir).model
    items = load_items(root, "validation", progress=False)
    labels, _ = identity_labels(items)

    def dataset(policy: str) -> ItemDataset:
        return ItemDataset(root=root, split="validation", items=items, labels=labels,
                           transform=item_transform(model), on_bad_image=policy)  # fmt: skip

    with pytest.raises(BadImageError, match="000002.jpg"):
        [dataset("error")[i] for i in range(len(items))]
    samples = [dataset("skip")[i] for i in range(len(items))]
    batch = ItemCollator(model.tokenize)(samples)
    assert batch["pixels"].shape[0] == len(items) - 1 and batch["bad_images"] == [str(broken)]
    with pytest.raises(ValueError, match="on_bad_image"):
        dataset("ignore")
    with pytest.raises(BadImageError, match="000002.jpg"):
        evaluate_items(model, root=root, split="validation", captions=None, batch_size=4)
    result = evaluate_items(
        model, root=root, split="validation", captions=None, batch_size=4, on_bad_image="skip"
    )
    assert result.metrics["skipped_images"] == 1 and result.bad_images[0]["file"] == str(broken)
    assert all(it.image_id != 2 for it in [*result.query_items, *result.gallery_items])


def test_train_on_bad_annotations_and_wrong_split_captions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], configs_dir: Path
) -> None:
    root = tmp_path / "df2"
    write_synthetic_df2(root, identities={"train": 3, "validation": 2}, size=48)
    base = ["--config", str(configs_dir / "deepfashion2_dualstream.yaml"), f"data.root={root}",
            f"trainer.output_dir={tmp_path / 'run'}"]  # fmt: skip
    val_store = tmp_path / "captions.validation.jsonl"
    assert (
        caption_cli.main(
            ["--root", str(root), "--split", "validation", "--out", str(val_store), "--no-progress"]
        )
        == 0
    )
    expect_error(capsys, train_cli.main, [*base, f"data.captions={val_store}"],
                 "captions.validation.jsonl", "split 'validation'", "'train'")  # fmt: skip
    path = root / "train" / "annos" / "000002.json"
    anno = json.loads(path.read_text())
    del anno["item1"]["category_id"]
    path.write_text(json.dumps(anno))
    expect_error(capsys, train_cli.main, base, "000002.json", "missing field 'item1.category_id'")
    anno["item1"]["category_id"] = "3"
    path.write_text(json.dumps(anno))
    expect_error(capsys, train_cli.main, base, "000002.json", "'item1.category_id'", "'3'")
    path.write_bytes(b'{"source": "user", \xff')
    expect_error(capsys, train_cli.main, base, "000002.json", "not UTF-8")


def test_eval_checkpoint_flags_reach_the_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``capret-eval map --checkpoint`` passes --on-bad-image and --min-caption-coverage to evaluate_items."""
    import capret.inference.dualstream.encoding as dualstream
    from capret.cli.eval import main as eval_main
    from capret.errors import DataError

    seen: dict[str, object] = {}

    def stop(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise DataError("stopped after the call")

    monkeypatch.setattr(
        dualstream, "load_model", lambda *a, **k: type("M", (), {"model": None, "device": "cpu"})()
    )
    monkeypatch.setattr(dualstream, "evaluate_items", stop)
    argv = ["--metric", "map", "--checkpoint", str(tmp_path), "--dataset", "demo", "--root", str(tmp_path)]
    assert eval_main([*argv, "--on-bad-image", "skip", "--min-caption-coverage", "0.9"]) == 2
    assert seen["on_bad_image"] == "skip" and seen["min_caption_coverage"] == 0.9


def test_a_bug_below_a_console_script_is_shown_as_a_bug(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare ValueError from library code is a broken contract, not the user's mistake: traceback, exit 3."""
    import capret.inference.dualstream.encoding as dualstream
    from capret.cli.eval import main as eval_main

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("vectors must be 2-D")

    monkeypatch.delenv("CAPRET_DEBUG", raising=False)
    monkeypatch.setattr(
        dualstream, "load_model", lambda *a, **k: type("M", (), {"model": None, "device": "cpu"})()
    )
    monkeypatch.setattr(dualstream, "evaluate_items", broken)
    capsys.readouterr()
    argv = ["--metric", "map", "--checkpoint", str(tmp_path), "--dataset", "demo", "--root", str(tmp_path)]
    assert eval_main(argv) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
    assert "error: ValueError: vectors must be 2-D" in err and "this is a bug in capret" in err
