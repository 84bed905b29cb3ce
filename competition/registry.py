"""A tiny registry: names -> objects plus plain-data info, whose errors list the valid names.

Used for adapters, architectures, losses, optimizers, schedulers and augmentations, so that every
"unknown name" error in the product reads the same way (smp's ``create_model`` style).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    info: dict = field(default_factory=dict)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, obj: Any = None, **info) -> Any:
        """``register("x", fn)`` or ``@register("x")``."""
        def add(o: Any) -> Any:
            key = name.lower()
            if key in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[key] = Entry(name, o, dict(info))
            return o
        return add(obj) if obj is not None else add

    def get(self, name: str) -> Entry:
        try:
            return self._entries[str(name).lower()]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def build(self, name: str, *args, **kwargs) -> Any:
        return self.get(name).obj(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(e.name for e in self._entries.values())

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in self._entries
