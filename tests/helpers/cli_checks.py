"""Assertions shared by the bad-input tests of the console scripts."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def expect_error(
    capsys: pytest.CaptureFixture[str],
    main: Callable[[list[str]], int],
    argv: list[str],
    *needles: str,
    code: int = 2,
) -> str:
    """Run ``main(argv)``; assert the exit code, one ``error:`` line containing every needle, no traceback."""
    capsys.readouterr()
    assert main(argv) == code, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
