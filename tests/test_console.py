"""The error boundary of every console script (``capret.console.run_guarded``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capret.console import run_guarded
from capret.errors import CheckpointError


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(
    ("exc", "needles"),
    [
        (ModuleNotFoundError("No module named 'faiss'", name="faiss"), ["faiss", "pip install faiss"]),
        (FileNotFoundError(2, "No such file or directory", "/data/x.json"), ["/data/x.json"]),
        (PermissionError(13, "Permission denied", "/ro/out"), ["/ro/out", "Permission denied"]),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), ["not UTF-8", "--debug"]),
        (json.JSONDecodeError("Expecting value", "{", 1), ["invalid JSON", "line 1"]),
        (
            CheckpointError("fails its checksum", path=Path("/runs/a/model.safetensors")),
            ["/runs/a/model.safetensors"],
        ),
        (KeyError("unknown reranker 'x'; valid: aqe"), ["unknown reranker 'x'"]),
    ],
)
def test_expected_failures_are_one_line(
    exc: BaseException,
    needles: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CAPRET_DEBUG", raising=False)
    assert run_guarded(_raise, exc) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_safetensors_error_is_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert run_guarded(lambda: load_file(str(path))) == 2
    assert "safetensors" in capsys.readouterr().err


def test_bugs_keep_their_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        run_guarded(lambda: 1 / 0)
