"""A name -> factory table, used for datasets, models and training strategies."""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, Optional, TypeVar

from pipeline.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, loader: Optional[str] = None):
        """`loader`: a module that registers every built-in entry, imported only when a name is missing or the
        names are listed (so that code which imports the one entry it uses depends on no other)."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader

    def _load(self) -> None:
        if self._loader is not None:
            importlib.import_module(self._loader)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")`."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, key: Optional[str] = None) -> T:
        """The entry registered as `name`; an unknown name is a ConfigError naming the parameter `key`."""
        if name not in self._items:
            self._load()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"{key or self.kind}: unknown {self.kind} {name!r}; choose one of "
                              f"{self.names()}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
