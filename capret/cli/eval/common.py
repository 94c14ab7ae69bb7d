"""Flags and helpers shared by the ``capret-eval`` modes."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from capret.cli.common import positive_int

T = TypeVar("T")


def config_from(namespace: argparse.Namespace, cls: type[T]) -> T:
    """The typed config ``cls`` from parsed flags (every dataclass field is a flag's ``dest``)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def rerankers() -> list[str]:
    from capret.retrieval.rerank import list_rerankers

    return list_rerankers()


def indexes() -> list[str]:
    from capret.retrieval.index import list_indexes

    return list_indexes()


def add_rerank(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rerank", choices=rerankers(), help="rerank the global ranking")
    p.add_argument(
        "--rerank-topk", type=positive_int, default=100, help="how many top results the reranker reorders"
    )


def add_out(p: argparse.ArgumentParser, what: str = "metrics.json and pictures") -> None:
    p.add_argument("--out", type=Path, help=f"also write {what} here")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size for feature extraction")


def add_ks(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ks",
        type=positive_int,
        nargs="+",
        default=[1, 5, 10, 20],
        help="cut-offs for R@k (default 1 5 10 20)",
    )


def as_dict(config: Any) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}


def require(value: T | None, flag: str, what: str = "") -> T:
    """``value``, or a one-line error naming the missing flag (narrows the Optional for the type checker)."""
    if value is None:
        from capret.config import ConfigError

        raise ConfigError(f"{flag} is required{': ' + what if what else ''}")
    return value
