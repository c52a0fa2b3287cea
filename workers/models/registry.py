"""The variant registry: a variant is one file in this folder that decorates its class with ``@register(name)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

VARIANTS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if name in VARIANTS:
            raise ValueError(f"variant '{name}' is registered twice ({VARIANTS[name].__name__} and {cls.__name__})")
        cls.variant = name
        VARIANTS[name] = cls
        return cls

    return decorate
