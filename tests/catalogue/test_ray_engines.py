"""The Ray Data engines give what the local engines give: the same caption store (exactly once, even after a
killed job) and the same catalogue rows. One local Ray (``num_cpus=2``) serves the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tiny_pipeline import write_shop_photos
from tiny_text import save_tiny_dual_stream
from tiny_vlm import write_deepfashion2

from capret.catalogue import Catalogue, add_images, create_engine
from capret.cli.main import main as capret_main
from capret.testing import ChatServer
from captioning.cli import main as caption_main
from captioning.store import iter_records, read_captions

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    from captioning.ray_engine import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_ray_engines_match_the_local_engines(
    local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # captioning: the same store, and a rerun captions nothing
    root = tmp_path / "df2"
    keys = write_deepfashion2(root, "validation", images=6, items_per_image=2)
    base = ["--root", str(root), "--no-progress", "--batch-size", "4"]
    assert caption_main([*base, "--out", str(tmp_path / "local.jsonl")]) == 0
    assert caption_main([*base, "--out", str(tmp_path / "ray.jsonl"), "--engine", "ray"]) == 0
    capsys.readouterr()
    assert read_captions(tmp_path / "ray.jsonl") == read_captions(tmp_path / "local.jsonl")
    assert sorted(read_captions(tmp_path / "ray.jsonl")) == sorted(keys)
    assert caption_main([*base, "--out", str(tmp_path / "ray.jsonl"), "--engine", "ray"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == len(keys)

    # catalogue: the same rows (vectors allclose)
    model = save_tiny_dual_stream(tmp_path / "model", pad="squarepad")
    photos = write_shop_photos(tmp_path / "photos" / "shop", count=5)
    tables = {}
    for engine in ("local", "ray"):
        folder = tmp_path / f"cat_{engine}"
        argv = ["catalogue", "create", "--model", str(model), "--root", str(tmp_path / "photos"), str(folder)]
        assert capret_main(argv) == 0
        catalogue = Catalogue.open(folder)
        report = add_images(catalogue, sorted(photos.iterdir()), engine=create_engine(engine), batch_images=2)
        assert report["added_rows"] == 5
        tables[engine] = {r["id"]: r for r in catalogue.scan(["id", "caption", "box", "vector"]).to_pylist()}
    assert tables["ray"].keys() == tables["local"].keys()
    for item, row in tables["local"].items():
        other = tables["ray"][item]
        assert other["caption"] == row["caption"] and other["box"] == row["box"]
        np.testing.assert_allclose(other["vector"], row["vector"], atol=1e-5)


def test_ray_extraction_matches_the_local_engine(local_ray: None, tmp_path: Path) -> None:
    from capret.cli.extract import main as extract_main
    from capret.inference.dualstream.extract import read_extraction

    model = save_tiny_dual_stream(tmp_path / "model", pad="squarepad")
    photos = write_shop_photos(tmp_path / "photos", count=7)
    argv = ["--checkpoint", str(model), "--images", str(photos), "--shard-size", "3", "--batch-size", "2"]
    assert extract_main([*argv, "--out", str(tmp_path / "local"), "--no-progress"]) == 0
    assert extract_main([*argv, "--out", str(tmp_path / "ray"), "--engine", "ray", "--no-progress"]) == 0
    local, local_ids = read_extraction(tmp_path / "local")
    remote, remote_ids = read_extraction(tmp_path / "ray")
    assert remote_ids == local_ids and len(local_ids) == 7
    np.testing.assert_allclose(remote, local, atol=1e-5)


@pytest.mark.slow
def test_killed_ray_caption_job_rerun_captions_each_missing_item_once(
    local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "df2"
    keys = write_deepfashion2(root, "validation", images=40, items_per_image=2, size=24)
    out = tmp_path / "c.jsonl"
    with ChatServer(latency=0.05) as server:
        argv = ["--root", str(root), "--backend", "openai", "--base-url", server.base_url, "--vlm", "m",
                "--rounds", "1", "--batch-size", "4", "--concurrency", "2", "--no-progress"]  # fmt: skip
        # requests per item, from an uninterrupted local run
        assert caption_main([*argv, "--out", str(tmp_path / "clean.jsonl")]) == 0
        per_item = server.requests / len(keys)
        assert per_item == int(per_item)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "captioning.cli",
                *argv,
                "--out",
                str(out),
                "--engine",
                "ray",
                "--set",
                "ray_num_cpus=2",
            ],  # fmt: skip
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own local Ray dies with it
        )
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 8:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        kept = [r["key"] for r in iter_records(out)]
        assert 8 <= len(kept) < len(keys) and len(set(kept)) == len(kept)
        # actors of the killed job finish the request they are in before they notice: wait for quiet
        before = -1
        while before != server.requests:
            before = server.requests
            time.sleep(5)
        capsys.readouterr()
        assert caption_main([*argv, "--out", str(out), "--engine", "ray"]) == 0
        summary = json.loads(capsys.readouterr().out)
        missing = len(keys) - len(kept)
        assert summary["skipped"] == len(kept) and summary["done"] == missing
        assert server.requests - before == missing * per_item  # each missing item captioned once
    final = [r["key"] for r in iter_records(out)]
    assert sorted(final) == sorted(keys)
    assert read_captions(out) == read_captions(tmp_path / "clean.jsonl")
