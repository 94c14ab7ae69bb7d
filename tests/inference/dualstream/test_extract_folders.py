"""``capret-extract`` output folders: refuse another model's folder, remove stale shards, verify checksums, and
survive ``kill -9`` during a rerun into a used folder (the folder reads as the old or the new complete run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_text import build_tiny_bert, save_tiny_dual_stream  # noqa: E402

from capret.cli.extract import main  # noqa: E402
from capret.errors import DataError  # noqa: E402
from capret.inference.dualstream.extract import read_extraction  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extract")
    bert = build_tiny_bert(root / "bert")
    for seed, name in ((0, "model_a"), (1, "model_b")):
        save_tiny_dual_stream(root / name, bert=bert, seed=seed, pad="squarepad")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(24):
        pixels = rng.integers(0, 255, size=(20 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"im{i:02d}.png")
    return {"root": root, "a": root / "model_a", "b": root / "model_b", "images": images}


def _argv(assets: dict[str, Path], model: str, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(assets[model]), "--images", str(assets["images"]), "--out", str(out), *extra]


def test_rerun_refuses_other_model_removes_stale_shards_and_checks_sums(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "feats"
    assert main(_argv(assets, "a", out, "--shard-size", "5")) == 0
    capsys.readouterr()
    feats_a, ids_a = read_extraction(out)
    assert feats_a.shape == (24, 24) and ids_a == [f"im{i:02d}" for i in range(24)]
    # another model into the same folder: refused, naming what differs; the folder is untouched
    before = sorted(p.name for p in out.iterdir())
    assert main(_argv(assets, "b", out)) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "model" in err and "--overwrite" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before
    # the same run with another shard size is allowed and leaves no stale shard behind
    assert main(_argv(assets, "a", out, "--shard-size", "7")) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest_r0.json").read_text())
    listed = {s[k] for s in manifest["shards"] for k in ("features", "ids")}
    assert {p.name for p in out.iterdir()} == listed | {"manifest_r0.json"}
    assert [s["rows"] for s in manifest["shards"]] == [7, 7, 7, 3]
    feats, ids = read_extraction(out)
    assert ids == ids_a and np.allclose(feats, feats_a, atol=1e-6)
    # --overwrite replaces it with model b
    assert main(_argv(assets, "b", out, "--overwrite")) == 0
    capsys.readouterr()
    feats_b, _ = read_extraction(out)
    assert not np.allclose(feats_b, feats_a, atol=1e-3)
    # a shard changed behind the manifest's back fails its checksum
    shard = out / json.loads((out / "manifest_r0.json").read_text())["shards"][0]["features"]
    data = np.load(shard)
    data[0, 0] += 1
    np.save(shard, data)
    with pytest.raises(DataError, match="fails its checksum"):
        read_extraction(out)


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    env["OMP_NUM_THREADS"] = "1"
    code = "import sys; from capret.cli.extract import main; raise SystemExit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip


def _incoming_files(out: Path) -> int:
    return sum(len(list(d.iterdir())) for d in out.glob(".incoming-*") if d.is_dir())


@pytest.mark.parametrize("kill_after_files", [1, pytest.param(6, marks=pytest.mark.slow)])
def test_kill_9_during_rerun_leaves_the_old_or_the_new_complete_run(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kill_after_files: int
) -> None:
    out = tmp_path / "feats"
    assert main(_argv(assets, "a", out, "--shard-size", "3")) == 0
    capsys.readouterr()
    old = read_extraction(out)
    proc = _spawn(_argv(assets, "b", out, "--overwrite", "--shard-size", "2", "--batch-size", "1"))
    deadline = time.monotonic() + 120
    while _incoming_files(out) < kill_after_files and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    feats, ids = read_extraction(out)  # verifies every checksum
    assert ids == old[1] and np.array_equal(feats, old[0])  # killed mid-run: the old complete run
    # a complete rerun afterwards publishes the new run and clears every leftover
    assert main(_argv(assets, "b", out, "--overwrite", "--shard-size", "2")) == 0
    capsys.readouterr()
    feats_b, ids_b = read_extraction(out)
    assert ids_b == old[1] and not np.allclose(feats_b, old[0], atol=1e-3)
    manifest = json.loads((out / "manifest_r0.json").read_text())
    listed = {s[k] for s in manifest["shards"] for k in ("features", "ids")}
    assert {p.name for p in out.iterdir()} == listed | {"manifest_r0.json"}


@pytest.mark.slow
def test_kill_9_at_random_moments_never_mixes_runs(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kill a rerun at several moments, including after it may have published: always one complete run."""
    out = tmp_path / "feats"
    assert main(_argv(assets, "a", out)) == 0
    capsys.readouterr()
    runs = {"a": read_extraction(out)[0]}
    assert main(_argv(assets, "b", tmp_path / "ref_b")) == 0
    capsys.readouterr()
    runs["b"] = read_extraction(tmp_path / "ref_b")[0]
    rng = np.random.default_rng(0)
    seen = set()
    for model in ("b", "a", "b"):
        proc = _spawn(_argv(assets, model, out, "--overwrite", "--shard-size", "4", "--batch-size", "2"))
        while _incoming_files(out) < 1 and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        feats, _ = read_extraction(out)
        matches = [name for name, ref in runs.items() if np.allclose(feats, ref, atol=1e-5)]
        assert len(matches) == 1, "the folder mixes runs"
        seen.add(matches[0])
    assert seen


def test_second_extraction_into_one_folder_is_refused_naming_the_holder(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "feats"
    assert main(_argv(assets, "a", tmp_path / "ref_a")) == 0
    capsys.readouterr()
    reference = read_extraction(tmp_path / "ref_a")
    proc = _spawn(_argv(assets, "a", out, "--shard-size", "2", "--batch-size", "1"))
    deadline = time.monotonic() + 120
    while _incoming_files(out) < 1 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "extraction A exited"
        time.sleep(0.01)
    assert main(_argv(assets, "b", out, "--overwrite")) == 2  # even --overwrite waits for no one
    err = capsys.readouterr().err
    assert f"PID {proc.pid}" in err and str(out) in err and err.count("\n") == 1 and "Errno" not in err
    assert proc.wait(timeout=120) == 0
    feats, ids = read_extraction(out)  # A's complete run, nothing of B
    assert ids == reference[1] and np.allclose(feats, reference[0], atol=1e-6)
    assert not list(tmp_path.glob(".*.lock"))  # clean releases leave no lock file


def test_ranks_of_one_torchrun_job_write_one_folder_together(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "feats"
    procs = []
    for rank in (0, 1):  # two processes at once, with the environment torchrun gives one job
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
        procs.append(_spawn(_argv(assets, "a", out, "--shard-size", "3", "--batch-size", "1"), env=env))
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    feats, ids = read_extraction(out)
    assert sorted(ids) == [f"im{i:02d}" for i in range(24)] and feats.shape == (24, 24)
