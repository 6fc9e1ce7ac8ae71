"""One registry type for every extension point (TDA methods, projections, Kronecker layer types, ensemble
kinds, tasks, executors): entries by name, in registration order, unknown names answered with the valid ones."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import unknown_choice

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind. `get` of an unknown name raises a UserError listing the valid names."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add (or replace) an entry; returns it, so a definition can register itself."""
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests and plug-ins that clean up after themselves)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise unknown_choice(self.what, name, self.names())
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
