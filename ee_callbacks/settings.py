"""Grouped keyword arguments: a small settings dataclass that a callback argument takes as itself or as a mapping of
some of its fields (the rest keep their defaults). Plain Python."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["settings_from_any"]

T = TypeVar("T")


def settings_from_any(cls: type[T], value: Any, argument: str) -> T:
    """``value`` as a ``cls``: None (the defaults), a ``cls``, or a mapping of some of its fields. An unknown key or
    another type is an error naming ``argument`` and listing the allowed keys."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    allowed = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(value, Mapping):
        raise TypeError(f"{argument} must be a mapping of {', '.join(allowed)} (or a {cls.__name__}), got "
                        f"{type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ValueError(f"unknown {argument} key(s) {unknown}; allowed: {', '.join(allowed)}")
    return cls(**dict(value))
