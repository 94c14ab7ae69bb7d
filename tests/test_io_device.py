"""``capret.io.default_device``: the one "CUDA if available" rule every device default goes through."""

from __future__ import annotations

import pytest
import torch
from repo_paths import REPO_ROOT

from capret.io import default_device

#: files that may still ask CUDA directly, and why (none of them picks a device)
ALLOWED = {
    "capret/io.py": "the rule itself",
    "capret/engine/checkpoint.py": "saves/restores the CUDA RNG states when CUDA exists",
    "capret/engine/distributed.py": "rejects an explicit cuda device on a machine without CUDA",
}


@pytest.mark.parametrize("cuda", [True, False])
def test_default_device(monkeypatch: pytest.MonkeyPatch, cuda: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert default_device() == torch.device("cuda" if cuda else "cpu")
    assert default_device("") == default_device(None)
    assert default_device(local_rank=3) == (torch.device("cuda", 3) if cuda else torch.device("cpu"))
    # an explicit device is kept as given, whatever CUDA and the local rank say
    assert default_device("cpu", local_rank=3) == torch.device("cpu")
    assert default_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_no_module_keeps_its_own_copy_of_the_rule() -> None:
    offenders = []
    for package in ("capret", "captioning"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            name = path.relative_to(REPO_ROOT).as_posix()
            if "cuda.is_available()" in path.read_text() and name not in ALLOWED:
                offenders.append(name)
    assert not offenders, f"use capret.io.default_device instead of torch.cuda.is_available() in {offenders}"
