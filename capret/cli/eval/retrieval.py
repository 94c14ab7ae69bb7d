"""``capret-eval map`` (or ``--metric map``): mAP / MAP@R / R@k from embeddings.

The source is explicit and exactly one: saved features (``--query-features``, see :mod:`.features`) or a trained
dual-stream checkpoint evaluated on a DeepFashion2-layout split (``--checkpoint``, see :mod:`.checkpoint`).
"""

from __future__ import annotations

from typing import Any

from capret.cli.eval.map_config import MapEvalConfig


def run(config: MapEvalConfig) -> dict[str, Any]:
    from capret.config import ConfigError

    if config.checkpoint is not None:
        from capret.cli.eval.checkpoint import run as run_checkpoint

        return run_checkpoint(config)
    if config.query_features is not None:
        from capret.cli.eval.features import run as run_features

        return run_features(config)
    raise ConfigError(
        "capret-eval map needs a source: --query-features q.npy ... (saved features) or --checkpoint CKPT "
        "--dataset deepfashion2 --root DIR (a trained model)"
    )
