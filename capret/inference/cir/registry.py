"""The registry of composed-retrieval methods (light to import: ``capret-eval --help`` lists the names
without loading torch or any model code; each name's module registers it when first asked for)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from capret.registry import Registry

if TYPE_CHECKING:  # the methods module is heavy; this one stays light for --help
    from capret.inference.cir.methods import CirMethod

__all__ = ["METHODS", "list_cir_methods", "register_cir_method"]

_BUILTIN = "capret.inference.cir.methods"
_ZEROSHOT = "capret.inference.cir.inversion_methods"

#: name -> factory ``(*, inputs: MethodInputs) -> CirMethod`` (typed in :mod:`capret.inference.cir.methods`,
#: which this light module must not import)
METHODS: Registry[CirMethod] = Registry(
    "CIR method",
    lazy_modules={
        "combiner": _BUILTIN,
        "image-only": _BUILTIN,
        "text-only": _BUILTIN,
        "sum": _BUILTIN,
        "cirevl": _BUILTIN,
        "searle": _ZEROSHOT,
        "searle-oti": _ZEROSHOT,
        "pic2word": _ZEROSHOT,
        "lincir": _ZEROSHOT,
    },
)


def register_cir_method(name: str) -> Callable[[Callable[..., CirMethod]], Callable[..., CirMethod]]:
    """Decorator registering a factory ``(*, inputs: MethodInputs) -> CirMethod`` under ``name``."""
    return METHODS.register(name)


def list_cir_methods() -> list[str]:
    """Every method name, registered or lazily importable."""
    return METHODS.names()
