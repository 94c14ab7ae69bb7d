"""Flags and helpers shared by the ``capret-eval`` modes."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypedDict, TypeVar

from capret.cli.common import add_device_flag, positive_int

T = TypeVar("T")

#: ``--ks`` left unset (``capret-eval official`` tells it from a user's own list by comparing with this)
DEFAULT_KS = (1, 5, 10, 20)


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
    add_device_flag(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size for feature extraction")


def add_ks(p: argparse.ArgumentParser) -> None:
    shown = " ".join(map(str, DEFAULT_KS))
    p.add_argument(
        "--ks",
        type=positive_int,
        nargs="+",
        default=list(DEFAULT_KS),
        help=f"cut-offs for R@k (default {shown})",
    )


class _Searches(Protocol):
    index: str
    rerank: str | None
    rerank_topk: int


class SearchFlags(TypedDict):
    """How a mode searches, as every evaluator it calls takes it (``evaluate_items``, ``evaluate_detected``,
    ``retrieve_and_evaluate``)."""

    index: str
    rerank: str | None
    rerank_topk: int


def search_flags(config: _Searches) -> SearchFlags:
    """``--index``, ``--rerank`` and ``--rerank-topk`` as the evaluators' keywords."""
    return {"index": config.index, "rerank": config.rerank, "rerank_topk": config.rerank_topk}


def flags_where(flags: Mapping[str, object], *, given: bool) -> list[str]:
    """The names of ``flags`` (``{"--root": config.root, ...}``) that were given, or (``given=False``) left unset,
    for one error naming them all."""
    return [flag for flag, value in flags.items() if (value is not None) is given]


def as_dict(config: Any) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}


def require(value: T | None, flag: str, what: str = "") -> T:
    """``value``, or a one-line error naming the missing flag (narrows the Optional for the type checker)."""
    if value is None:
        from capret.config import ConfigError

        raise ConfigError(f"{flag} is required{': ' + what if what else ''}")
    return value
