"""Config sections → dataclasses, refusing keys the dataclass does not know (a typo in a config
must not silently fall back to a default)."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def from_section(cls: type[T], values: dict | None, section: str) -> T:
    """``cls(**values)``; unknown keys raise ``ValueError`` naming ``section`` (e.g. ``evaluation.probe``)."""
    values = dict(values or {})
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{section}: unknown keys {unknown}")
    return cls(**values)
