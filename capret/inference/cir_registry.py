"""The registry of composed-retrieval methods (light to import: ``capret-eval --help`` lists the names
without loading torch or any model code; each name's module registers it when first asked for)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from capret.registry import Registry

if TYPE_CHECKING:
    from capret.inference.cir_methods import CirMethod, MethodInputs

__all__ = ["create_cir_method", "list_cir_methods", "register_cir_method"]

_BUILTIN = "capret.inference.cir_methods"

_METHODS: Registry[CirMethod] = Registry(
    "CIR method",
    lazy_modules={
        "combiner": _BUILTIN,
        "image-only": _BUILTIN,
        "text-only": _BUILTIN,
        "sum": _BUILTIN,
        "cirevl": _BUILTIN,
    },
)


def register_cir_method(name: str) -> Callable[[Callable[..., CirMethod]], Callable[..., CirMethod]]:
    """Decorator registering a factory ``(*, inputs: MethodInputs) -> CirMethod`` under ``name``."""
    return _METHODS.register(name)


def create_cir_method(name: str, inputs: MethodInputs) -> CirMethod:
    """Build the method ``name``; an unknown name lists the valid ones."""
    return _METHODS.create(name, inputs=inputs)


def list_cir_methods() -> list[str]:
    """Every method name, registered or lazily importable."""
    return _METHODS.names()
