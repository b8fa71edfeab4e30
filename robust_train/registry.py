"""One name -> thing registry for every kind of thing a recipe or a command line names: models, methods, attacks,
interpretation maps, data sets and report sections (`python -m robust_train models|methods|attacks|maps|data`).

A name is registered once and means one thing. When a class is registered by decorating it, the registry gives the
class its name (`cls.name`), so the name is written once, in the decorator.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from robust_train.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None, entry: T | None = None) -> Callable[[T], T]:
        """Decorator registering a class or function under `name` (default: its `__name__`); with `entry`,
        registers that object directly (e.g. a preset of an attack registered elsewhere)."""

        def add(obj: T) -> T:
            key = name or obj.__name__
            if key in self._entries:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            if isinstance(obj, type) and name is not None:
                obj.name = key
            return obj

        if entry is not None:
            add(entry)
        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}")
        return self._entries[name]

    def create(self, name: str, **kwargs):
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def summary(self, name: str) -> str:
        """The first line of the entry's docstring (`summary` attribute first, for presets)."""
        entry = self.get(name)
        text = getattr(entry, "summary", None) or entry.__doc__ or ""
        return text.strip().splitlines()[0] if text.strip() else ""

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
