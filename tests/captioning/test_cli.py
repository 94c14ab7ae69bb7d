"""capret-caption end to end: resume after kill -9, sharding, limit, overwrite, failures, sources, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from repo_paths import REPO_ROOT, SHARED_DATA
from tiny_vlm import write_deepfashion2

from capret.testing import ChatServer
from captioning.cli import main
from captioning.sources import create_source, parse_shard, select_shard, shard_of
from captioning.store import failures_path, iter_records, read_captions, read_records

REPO = REPO_ROOT
SHARED = SHARED_DATA


@pytest.fixture(scope="module")
def df2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("df2")
    keys = write_deepfashion2(root, "validation", images=12, items_per_image=2)
    return root, keys


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main([*argv, "--no-progress"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else {})


def test_template_run_then_resume_skips_everything(df2, tmp_path, capsys) -> None:
    root, keys = df2
    out = tmp_path / "c.jsonl"
    code, summary = _run(["--root", str(root), "--out", str(out), "--batch-size", "5"], capsys)
    assert code == 0 and summary["done"] == len(keys) and summary["failed"] == 0 and summary["example"]
    records = read_records(out)
    assert sorted(records) == sorted(keys)
    record = records[keys[0]]
    assert set(record) == {"key", "caption", "dialogue", "backend", "model", "prompt_version", "created",
                           "dataset", "split", "fingerprint",
                           "oracle", "caption_source", "category"}  # fmt: skip
    assert record["backend"] == "template" and record["prompt_version"] == "capret-chat-v1"
    assert (record["dataset"], record["split"]) == ("deepfashion2", "validation")
    from capret.data.captions import split_fingerprint
    from capret.data.deepfashion2 import load_items

    assert record["fingerprint"] == split_fingerprint(load_items(root, "validation", progress=False))
    assert record["oracle"] is False and record["caption_source"] == "pixels"
    assert record["category"] == {"name": "", "source": "none"}  # no category model given: no category
    assert summary["oracle"] is False and summary["caption_source"] == "pixels"
    assert all(set(turn) == {"q", "a"} for turn in record["dialogue"])
    before = out.read_bytes()
    code, summary = _run(["--root", str(root), "--out", str(out)], capsys)
    assert code == 0 and summary["done"] == 0 and summary["skipped"] == len(keys)
    assert out.read_bytes() == before


def test_shards_are_disjoint_and_cover_all_keys(df2, tmp_path, capsys) -> None:
    root, keys = df2
    seen: list[str] = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        code, _ = _run(["--root", str(root), "--out", str(out), "--shard", f"{i}/3", "--rounds", "1"], capsys)
        assert code == 0
        seen.extend(read_captions(out))
    assert sorted(seen) == sorted(keys)  # covering, and disjoint (no key twice)
    targets = create_source("deepfashion2", root=root, split="validation")
    for n in (1, 2, 5):
        parts = [select_shard(targets, i, n) for i in range(n)]
        assert sorted(t.key for p in parts for t in p) == sorted(keys)
    assert shard_of("deepfashion2/000001/1", 7) == shard_of("deepfashion2/000001/1", 7)
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_limit_and_explicit_overwrite(df2, tmp_path, capsys) -> None:
    root, keys = df2
    out = tmp_path / "c.jsonl"
    code, summary = _run(["--root", str(root), "--out", str(out), "--limit", "4"], capsys)
    assert summary["done"] == 4 and sorted(read_captions(out)) == sorted(keys)[:4]
    code, summary = _run(["--root", str(root), "--out", str(out), "--limit", "2", "--overwrite"], capsys)
    assert code == 0 and summary["done"] == 2 and summary["skipped"] == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6 and [x.get("overwrite", False) for x in lines] == [False] * 4 + [True] * 2
    assert len(read_captions(out)) == 4


def test_missing_image_is_a_logged_failure_retried_next_run(df2, tmp_path, capsys) -> None:
    root, keys = df2
    image = root / "validation" / "image" / "000003.jpg"
    hidden = tmp_path / "hidden.jpg"
    os.replace(image, hidden)
    out = tmp_path / "c.jsonl"
    try:
        # default policy: stop, naming the file (one line, no traceback)
        assert main(["--root", str(root), "--out", str(tmp_path / "e.jsonl"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "000003.jpg" in err and "image not found" in err and "Traceback" not in err
        code, summary = _run(["--root", str(root), "--out", str(out), "--on-bad-image", "skip"], capsys)
    finally:
        os.replace(hidden, image)
    assert code == 1 and summary["failed"] == 2 and summary["done"] == len(keys) - 2
    assert summary["failure_reasons"] == {"cannot open image": 2}
    assert summary["bad_images"] == 2 and all(f.endswith("000003.jpg") for f in summary["bad_image_files"])
    failures = [json.loads(x) for x in failures_path(out).read_text().splitlines()]
    assert {f["key"] for f in failures} == {"deepfashion2/000003/1", "deepfashion2/000003/2"}
    assert "000003.jpg" in failures[0]["reason"]
    code, summary = _run(["--root", str(root), "--out", str(out)], capsys)
    assert code == 0 and summary["done"] == 2 and summary["skipped"] == len(keys) - 2
    assert sorted(read_captions(out)) == sorted(keys)


def test_openai_backend_through_the_cli_reports_tokens(df2, tmp_path, capsys) -> None:
    root, keys = df2
    out = tmp_path / "c.jsonl"
    with ChatServer(faults=["429", "500"]) as server:
        argv = ["--root", str(root), "--out", str(out), "--backend", "openai", "--base-url", server.base_url]
        argv += [
            "--vlm",
            "m",
            "--rounds",
            "2",
            "--limit",
            "5",
            "--concurrency",
            "4",
            "--set",
            "openai.seed=1",
        ]
        code, summary = _run(argv, capsys)
    assert code == 0 and summary["done"] == 5
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    record = next(iter_records(out))
    assert record["backend"] == "openai" and record["model"]["vlm"] == "m" and record["model"]["seed"] == 1
    assert len(record["dialogue"]) == 3


def test_usage_errors_are_one_line_messages(df2, tmp_path, capsys) -> None:
    root, _ = df2
    cases = [
        (["--out", str(tmp_path / "x.jsonl")], "--root is required"),
        (["--root", str(root)], "--out is required"),
        (
            ["--root", str(root), "--out", str(tmp_path / "x.jsonl"), "--backend", "gpt"],
            "valid backends: clip, openai,",
        ),
        (
            ["--root", str(root), "--out", str(tmp_path / "x.jsonl"), "--dataset", "coco"],
            "valid names: circo, cirr",
        ),
        (
            ["--root", str(root), "--out", str(tmp_path / "x.jsonl"), "--set", "loop.roundz=2"],
            "valid keys: rounds",
        ),
        (["--root", str(tmp_path / "nope"), "--out", str(tmp_path / "x.jsonl")], "does not exist"),
        (["--root", str(root), "--out", str(tmp_path / "x.jsonl"), "--backend", "openai"], "--base-url"),
        (["--root", str(root), "--out", str(tmp_path / "x.jsonl"), "--rounds", "-1"], "rounds must be >= 0"),
    ]
    for argv, message in cases:
        assert main([*argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_reference_image_sources(tmp_path) -> None:
    cirr = create_source("cirr", root=SHARED / "cirr", split="val")
    assert len(cirr) > 1000 and all(t.key.startswith("cirr/") and t.key.endswith("/0") for t in cirr)
    assert [t.key for t in cirr] == sorted(t.key for t in cirr)
    with pytest.raises(FileNotFoundError, match="image not found"):
        cirr[0].open_image()  # images are not shipped: a clear error naming the file
    fiq = create_source("fashioniq", root=SHARED / "fashioniq", split="val", category="dress")
    assert fiq and fiq[0].key.startswith("fashioniq/") and fiq[0].annotation["category_name"] == "dress"
    assert fiq[0].category == ""  # the subset name is annotation: only the oracle may hand it to a prompt
    circo = create_source("circo", root=SHARED / "circo", split="val")
    assert 0 < len(circo) <= 220
    folder = tmp_path / "pics" / "a"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "one.png")
    (folder / "notes.txt").write_text("x")
    images = create_source("images", root=tmp_path / "pics", split=None)
    assert [t.key for t in images] == ["images/a/one/0"] and images[0].open_image().size == (8, 8)


def _lines(path: Path) -> bytes:
    data = path.read_bytes() if path.exists() else b""
    return data[: data.rfind(b"\n") + 1]


def test_kill_9_mid_run_then_resume_keeps_every_key_exactly_once(tmp_path, capsys) -> None:
    root = tmp_path / "df2"
    keys = write_deepfashion2(root, "validation", images=60, items_per_image=2, size=24)
    out = tmp_path / "c.jsonl"
    with ChatServer(latency=0.002) as server:
        argv = ["--root", str(root), "--out", str(out), "--backend", "openai", "--base-url", server.base_url,
                "--vlm", "m", "--rounds", "2", "--batch-size", "3", "--concurrency", "3", "--no-progress"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        kept = b""
        for kill_after in (6, 24):  # kill -9 twice, at different points
            proc = subprocess.Popen([sys.executable, "-m", "captioning.cli", *argv], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            deadline = time.monotonic() + 60
            while (
                _lines(out).count(b"\n") < kill_after and time.monotonic() < deadline and proc.poll() is None
            ):
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
            complete = _lines(out)
            assert complete.startswith(kept)  # finished captions are never rewritten
            kept = complete
            assert kept.count(b"\n") < len(keys)
        code, summary = _run(argv, capsys)
        assert code == 0
        assert summary["skipped"] == kept.count(b"\n") and summary["done"] == len(keys) - summary["skipped"]
        final = out.read_bytes()
        assert final.startswith(kept)  # byte-identical finished lines
        file_keys = [r["key"] for r in iter_records(out)]
        assert sorted(file_keys) == sorted(keys)  # every key exactly once
        # the interrupted-and-resumed captions equal an uninterrupted run's
        clean = tmp_path / "clean.jsonl"
        _run(["--root", str(root), "--out", str(clean), *argv[4:]], capsys)
    assert read_captions(out) == read_captions(clean)


def test_config_file_then_set_then_flags(tmp_path) -> None:
    from captioning.cli import build_parser, config_from_args

    path = tmp_path / "caption.yaml"
    path.write_text(
        "dataset: demo\nroot: /data/demo\nout: a.jsonl\nbatch_size: 4\nloop:\n  rounds: 3\n  view: box\n"
        "openai:\n  base_url: [http://a/v1, http://b/v1]\n"
    )
    args = build_parser().parse_args(
        ["--config", str(path), "--set", "loop.rounds=5", "--set", "batch_size=6", "--batch-size", "7"]
    )
    config = config_from_args(args)
    assert config.dataset == "demo" and str(config.root) == "/data/demo" and config.loop.view == "box"
    assert config.loop.rounds == 5 and config.batch_size == 7  # flags beat --set, --set beats the file
    assert config.openai.base_url == ["http://a/v1", "http://b/v1"] and config.loop.max_reasks == 2


def test_second_captioning_run_into_one_store_is_refused(df2, tmp_path, capsys) -> None:
    from lock_holder import held_by_other_process

    root, keys = df2
    out = tmp_path / "c.jsonl"
    code, _ = _run(["--root", str(root), "--out", str(out), "--limit", "4"], capsys)
    assert code == 0
    before = out.read_bytes()
    with held_by_other_process(out, what="caption store") as pid:
        code = main(["--root", str(root), "--out", str(out), "--no-progress", "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and f"PID {pid}" in err and str(out) in err and err.count("\n") == 1
        assert main(["--repair", "--out", str(out)]) == 2  # the repair rewrite waits for the writer too
        assert f"PID {pid}" in capsys.readouterr().err
    assert out.read_bytes() == before  # nothing of the refused runs mixed in
    fresh = tmp_path / "new.jsonl"
    with held_by_other_process(fresh, what="caption store"):
        assert main(["--root", str(root), "--out", str(fresh), "--no-progress"]) == 2
    assert not fresh.exists() and not failures_path(fresh).exists()  # no 0-byte store left behind


def test_no_progress_silences_the_dataset_index_bar(tmp_path, capsys, monkeypatch) -> None:
    """The DeepFashion2 index load draws a bar on a cold cache; ``--no-progress`` must silence it too."""
    root = tmp_path / "df2"
    write_deepfashion2(root, "validation", images=3, items_per_image=1)
    monkeypatch.delenv("CAPRET_NO_PROGRESS", raising=False)
    for flags, shown in (([], True), (["--no-progress"], False)):
        monkeypatch.setenv("CAPRET_CACHE", str(tmp_path / f"cache-{shown}"))  # cold: the index is read
        argv = ["--root", str(root), "--out", str(tmp_path / f"out-{shown}"), "--rounds", "1", *flags]
        assert main(argv) == 0
        assert ("DeepFashion2 validation" in capsys.readouterr().err) is shown
