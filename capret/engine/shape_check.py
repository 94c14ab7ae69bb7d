"""Say *why* weights do not fit a model: the tensor whose shape differs, and the config keys that differ from
the configuration saved with the checkpoint (a changed ``model.width`` is the usual cause)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from capret.errors import CheckpointError

__all__ = ["check_shapes", "config_differences"]


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], *, limit: int = 6) -> list[str]:
    """``key: saved -> current`` for every config leaf that differs (the first ``limit``)."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]


def check_shapes(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    path: Path,
    saved_config: dict[str, Any] | None,
    config: dict[str, Any] | None,
) -> None:
    """Name the tensors whose shapes differ, and the config keys that differ from the checkpoint's own."""
    own = model.state_dict()
    wrong = [
        f"{k} {list(v.shape)} in the checkpoint vs {list(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    if not wrong:
        return
    hint = ""
    if saved_config is not None and config is not None:
        diff = config_differences(saved_config, config)
        hint = (
            f"; config keys that differ from the checkpoint's saved config: {'; '.join(diff)}"
            if diff
            else "; the config equals the checkpoint's saved config"
        )
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    raise CheckpointError(f"shape mismatch: {wrong[0]}{more}{hint}", path=path)
