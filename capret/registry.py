"""One small registry type shared by every pluggable family (encoders, losses, datasets, rerankers, backends).

Each family module keeps its own ``Registry`` instance and exposes ``register_*``, ``create_*`` and ``list_*``
functions built on it, in the manner of timm's model registry: creating an unknown name fails loudly and
lists the valid names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from capret.errors import UnknownNameError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Maps names to factories of one family."""

    def __init__(self, family: str, *, lazy_modules: dict[str, str] | None = None) -> None:
        """``lazy_modules`` maps a name to the module that registers it on import, so heavy members (training
        tasks) are imported only when asked for and ``--help`` stays fast."""
        self.family = family
        self._entries: dict[str, Callable[..., T]] = {}
        self._lazy = dict(lazy_modules or {})

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a factory under ``name``; a duplicate name is an error."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._entries[name] = factory
            return factory

        return decorator

    def functions(
        self,
    ) -> tuple[
        Callable[[str], Callable[[Callable[..., T]], Callable[..., T]]],
        Callable[..., T],
        Callable[[], list[str]],
    ]:
        """The family's three public functions, ``register_<x>, create_<x>, list_<x>s = REGISTRY.functions()``.

        ``register_<x>(name)`` decorates a factory, ``create_<x>(name, **kwargs)`` builds one (an unknown name raises
        :class:`~capret.errors.UnknownNameError` listing the valid ones) and ``list_<x>s()`` names them all.
        """
        return self.register, self.create, self.names

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.family} {name!r}; valid names: {', '.join(self.names()) or '(none)'}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy
