"""The error boundary of every console script (``capret.console.run_guarded``): a CapretError or an OS/parse error
of a user's file is one line and exit 2; anything else is a bug, shown with its traceback and exit 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capret.console import BUG_EXIT_CODE, USER_ERROR_EXIT_CODE, run_guarded
from capret.errors import (
    CapretError,
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    NotAvailableError,
    UnknownNameError,
    UsageError,
)


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(
    ("exc", "needles"),
    [
        (FileNotFoundError(2, "No such file or directory", "/data/x.json"), ["/data/x.json"]),
        (PermissionError(13, "Permission denied", "/ro/out"), ["/ro/out", "Permission denied"]),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), ["not UTF-8", "--debug"]),
        (json.JSONDecodeError("Expecting value", "{", 1), ["invalid JSON", "line 1"]),
        (
            CheckpointError("fails its checksum", path=Path("/runs/a/model.safetensors")),
            ["/runs/a/model.safetensors"],
        ),
        (UnknownNameError("unknown reranker 'x'; valid: aqe"), ["unknown reranker 'x'; valid: aqe"]),
        (IsADirectoryError(21, "Is a directory", "/data"), ["/data", "Is a directory"]),
        (ConfigError("trainer.lr must be > 0, got -1"), ["trainer.lr", "-1"]),
        (UsageError("--k must be >= 1, got 0"), ["--k", "got 0"]),
        (NotAvailableError("--engine ray is not available"), ["--engine ray"]),
    ],
)
def test_expected_failures_are_one_line(
    exc: BaseException,
    needles: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CAPRET_DEBUG", raising=False)
    assert run_guarded(_raise, exc) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_safetensors_error_is_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert run_guarded(lambda: load_file(str(path))) == USER_ERROR_EXIT_CODE
    assert "safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "exc",
    [
        ZeroDivisionError("division by zero"),
        ValueError("vectors must be 2-D"),
        KeyError("image_id"),
        TypeError("unsupported operand"),
        ModuleNotFoundError("No module named 'faiss'", name="faiss"),
        OSError("device out of sync"),  # names no file: not about the user's input
    ],
)
def test_bugs_show_their_traceback_and_say_so(
    exc: BaseException, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPRET_DEBUG", raising=False)
    assert run_guarded(_raise, exc) == BUG_EXIT_CODE == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "_raise" in err  # the frame that raised
    assert f"error: {type(exc).__name__}" in err
    assert "this is a bug in capret" in err.splitlines()[-1] and "report" in err.splitlines()[-1]


def test_every_library_error_is_in_the_family() -> None:
    import capret.errors as errors

    classes = [getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, CapretError), cls
    # Old import paths keep working and name the same classes.
    from capret.config import ConfigError as config_error
    from capret.console import NotAvailableError as console_error
    from capret.engine.trainer import NonFiniteLossError as trainer_error

    assert (config_error, console_error, trainer_error) == (
        ConfigError,
        NotAvailableError,
        NonFiniteLossError,
    )
    # Stand-ins for built-ins still catch as those built-ins.
    assert issubclass(UnknownNameError, KeyError) and issubclass(NotAvailableError, RuntimeError)
    assert str(UnknownNameError("unknown x")) == "unknown x"  # not KeyError's quoted form


def test_debug_shows_the_traceback_of_user_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPRET_DEBUG", "1")
    assert run_guarded(_raise, ConfigError("bad key 'x'")) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1] == "error: bad key 'x'"
