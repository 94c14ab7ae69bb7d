"""The registry of composed-retrieval methods (light to import: ``capret-eval --help`` lists the names
without loading torch or any model code; each name's module registers it when first asked for)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from capret.registry import Registry

__all__ = ["METHODS", "CirMethodLike", "list_cir_methods", "register_cir_method"]


class CirMethodLike(Protocol):
    """What the registry holds: the face of :class:`capret.inference.cir.methods.CirMethod` that callers outside
    the method read. A Protocol here (not the class) keeps this module light for ``--help`` without an import
    of the heavy methods module, which imports this one (``tests/test_layout.py`` counts every import)."""

    name: str

    def describe(self) -> dict[str, Any]: ...

    def report(self) -> dict[str, Any]: ...


_BUILTIN = "capret.inference.cir.methods"
_ZEROSHOT = "capret.inference.cir.inversion_methods"

#: name -> factory ``(*, inputs: MethodInputs) -> CirMethod`` (typed in :mod:`capret.inference.cir.methods`,
#: which this light module must not import)
METHODS: Registry[CirMethodLike] = Registry(
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


def register_cir_method(
    name: str,
) -> Callable[[Callable[..., CirMethodLike]], Callable[..., CirMethodLike]]:
    """Decorator registering a factory ``(*, inputs: MethodInputs) -> CirMethod`` under ``name``."""
    return METHODS.register(name)


def list_cir_methods() -> list[str]:
    """Every method name, registered or lazily importable."""
    return METHODS.names()
