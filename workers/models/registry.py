"""The variant registry: a variant is one file in this folder that decorates its class with ``@register(name)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from workers.models.base import Autoencoder

VARIANTS: dict[str, type[Autoencoder]] = {}

T = TypeVar("T", bound="type[Autoencoder]")


def register(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if name in VARIANTS:
            raise ValueError(f"variant '{name}' is registered twice ({VARIANTS[name].__name__} and {cls.__name__})")
        cls.variant = name
        VARIANTS[name] = cls
        return cls

    return decorate
