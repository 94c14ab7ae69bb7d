"""Crash safety and one writer: ``kill -9`` during ``catalogue add`` leaves a table that opens and holds whole
batches only, and the rerun adds exactly the missing photos; a second writer is refused naming the folder and the
holder's PID, and nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_pipeline import write_shop_photos
from tiny_text import save_tiny_dual_stream

from capret.catalogue import Catalogue
from capret.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["LANCE_LOG"] = "error"
    return env


@pytest.fixture
def catalogue_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    model = save_tiny_dual_stream(tmp_path / "model", pad="squarepad")
    write_shop_photos(tmp_path / "photos" / "shop", count=60)
    folder = tmp_path / "cat"
    argv = ["catalogue", "create", "--model", str(model), "--root", str(tmp_path / "photos"), str(folder)]
    assert main([*argv, "--captioner", "template"]) == 0
    capsys.readouterr()
    return folder


def test_kill_9_during_add_then_rerun_adds_exactly_the_missing(
    tmp_path: Path, catalogue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos" / "shop"
    argv = [sys.executable, "-m", "capret.cli.main", "catalogue", "add", str(catalogue_dir), str(photos)]
    proc = subprocess.Popen(
        [*argv, "--batch-images", "2", "--no-progress"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    catalogue = Catalogue.open(catalogue_dir)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            catalogue.refresh()
            if len(catalogue) >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the add finished before it could be killed; make the test photos more"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    reopened = Catalogue.open(catalogue_dir)  # opens: the last committed version
    rows = len(reopened)
    assert 4 <= rows < 60 and rows % 2 == 0  # whole batches of two photos (one row each) only
    ids = reopened.scan(["id"]).column("id").to_pylist()
    assert len(set(ids)) == len(ids)

    assert (
        main(["catalogue", "add", str(catalogue_dir), str(photos), "--batch-images", "8", "--no-progress"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["present"] == rows and report["added_images"] == 60 - rows and report["duplicates"] == []
    final = Catalogue.open(catalogue_dir).scan(["id"]).column("id").to_pylist()
    assert sorted(final) == sorted(f"shop/{i:06d}/0" for i in range(1, 61))


def test_second_writer_refused_naming_folder_and_pid(
    tmp_path: Path, catalogue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from capret.locks import exclusive_output\n"
            "with exclusive_output(Path(sys.argv[1]).resolve(), what='catalogue'):\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(120)\n",
            str(catalogue_dir),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        photos = tmp_path / "photos" / "shop"
        code = main(["catalogue", "add", str(catalogue_dir), str(photos / "000001.png"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2
        assert str(catalogue_dir.resolve()) in err and f"PID {holder.pid}" in err
        assert main(["catalogue", "optimize", str(catalogue_dir)]) == 2  # every writer, not only add
        assert main(["catalogue", "stats", str(catalogue_dir)]) == 0  # readers never wait
    finally:
        holder.kill()
        holder.wait(timeout=30)
    capsys.readouterr()
    # the holder died holding the lock: the next writer takes it over and nothing was lost
    assert (
        main(["catalogue", "add", str(catalogue_dir), str(tmp_path / "photos" / "shop" / "000001.png")]) == 0
    )
    assert json.loads(capsys.readouterr().out)["added_rows"] == 1
