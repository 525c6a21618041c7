"""Grouped keyword arguments: a small settings dataclass that a callback argument takes as itself or as a mapping of
some of its fields (the rest keep their defaults). Plain Python."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["settings_from_any", "fold_flat_keywords"]

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


def fold_flat_keywords(owner: str, keywords: Mapping, aliases: Mapping[str, tuple], groups: dict) -> dict:
    """Fold flat keywords (``EarlyExitProbe(max_overhead=0.02)``) into their grouped arguments
    (``cadence={"max_overhead": 0.02}``): ``aliases`` maps each flat name to ``(group, key)``; ``groups`` holds each
    group's value as a mapping (or None). A keyword that is not an alias is a TypeError listing the allowed ones; a
    value given both ways is a ValueError. Returns the updated groups (new dicts; the inputs are left as they are)."""
    unknown = sorted(k for k in keywords if k not in aliases)
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword argument(s) {unknown}; besides its named arguments it takes "
                        f"{', '.join(sorted(aliases))}")
    merged = {name: dict(value) if value is not None else None for name, value in groups.items()}
    for flat, value in keywords.items():
        group, key = aliases[flat]
        target = merged[group] if merged[group] is not None else {}
        if key in target and target[key] != value:
            raise ValueError(f"{owner}: {flat}={value!r} and {group}[{key!r}]={target[key]!r} disagree; pass one")
        target[key] = value
        merged[group] = target
    return merged
