"""Paths inside the repository and to the real annotation files beside it (``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def require_shared_data(*parts: str) -> Path:
    """``../shared/data/<parts>``. CI always has it, so a missing folder *fails* the calling test; set
    ``CAPRET_ALLOW_MISSING_SHARED=1`` to skip instead on a machine without it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"real annotation files not found at {path} (../shared/data beside the repository)"
        if os.environ.get("CAPRET_ALLOW_MISSING_SHARED") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return path
