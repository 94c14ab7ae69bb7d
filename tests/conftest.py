"""Fixtures shared by the whole suite.

- ``shared_data``: the real benchmark annotation files in ``../shared/data``. CI always has them, so a test
  that needs them *fails* when they are missing (set ``CAPRET_ALLOW_MISSING_SHARED=1`` to skip instead on a
  machine without them).
- ``one_thread``: tiny models gain nothing from intra-op threads, and on a loaded 2-core CPU two threads can be
  several times slower; modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")`` or use it
  as a module-scoped autouse alias.
- ``_user_cache`` (autouse): ``$CAPRET_CACHE`` in a temporary folder for the whole session.
- ``repo_root`` / ``configs_dir``: paths inside the repository.

Test helpers (tiny model and dataset builders, DDP workers) live in ``tests/helpers`` and are importable by
name because ``pyproject.toml`` puts that folder on pytest's ``pythonpath``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from repo_paths import CONFIGS, REPO_ROOT, require_shared_data


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point ``$CAPRET_CACHE`` (dataset index caches) at a temporary folder, never the user's home."""
    previous = os.environ.get("CAPRET_CACHE")
    os.environ["CAPRET_CACHE"] = str(tmp_path_factory.mktemp("capret_cache"))
    yield
    if previous is None:
        os.environ.pop("CAPRET_CACHE", None)
    else:
        os.environ["CAPRET_CACHE"] = previous


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def configs_dir() -> Path:
    return CONFIGS


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
