"""One writer per output for ``capret oti`` and ``capret ablate``: while another process holds the output, the
command is refused at once with one line naming the output and the holder's PID, and the output is untouched.

(Training, extraction, index build and captioning have their own concurrency tests beside their other tests:
tests/engine/test_train_lock.py, tests/inference/dualstream/test_extract_folders.py,
tests/inference/query/test_pipeline.py, tests/captioning/test_cli.py.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lock_holder import held_by_other_process  # noqa: E402
from tiny_zeroshot import tiny_hf_clip, write_image_folder  # noqa: E402

from capret.cli.main import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *, output: Path, pid: int) -> None:
    capsys.readouterr()  # what building the fixtures printed
    start = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - start < 30  # at once: no model was trained or loaded first
    err = capsys.readouterr().err
    assert f"PID {pid}" in err and str(output) in err and err.count("\n") == 1 and "Traceback" not in err


def test_oti_into_a_token_store_held_by_another_process_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = tiny_hf_clip(tmp_path / "clip")
    images = write_image_folder(tmp_path / "images", n=2)
    tokens = tmp_path / "tokens.safetensors"
    argv = ["oti", "--clip", str(clip), "--images", str(images), "--out", str(tokens), "--steps", "2"]
    argv += ["--no-progress"]
    with held_by_other_process(tokens, what="OTI token store") as pid:
        _refused(capsys, argv, output=tokens, pid=pid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "images"]  # nothing written beside it
    assert main(argv) == 0  # once the holder is gone the same command runs
    capsys.readouterr()
    assert tokens.is_file()


def test_ablate_into_a_folder_held_by_another_process_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"task": "dualstream", "data": {"root": str(tmp_path / "data")}}))
    variants = tmp_path / "variants.yaml"
    variants.write_text(yaml.safe_dump({"variants": [{"name": "a", "overrides": {}}]}))
    out = tmp_path / "out"
    argv = ["ablate", "--config", str(config), "--variants", str(variants), "--seeds", "1", "--out", str(out)]
    with held_by_other_process(out, what="ablation folder") as pid:
        _refused(capsys, argv, output=out, pid=pid)
    assert not out.exists()
