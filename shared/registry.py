"""One generic registry for every extension point (algorithms, rewards, model adapters).

Entries are either objects registered with the ``register`` decorator or dotted import
strings (``"pkg.module.Class"``) that are imported only when first looked up, so heavy
dependencies load only when selected. A key that is not registered but looks like a dotted
path is imported as a user plugin. Duplicate names raise; unknown names raise with the list
of choices and the nearest one.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate registry entry. ``str()`` gives the whole teaching message."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


def import_dotted(path: str) -> object:
    """Import ``"package.module.Attr"`` and return ``Attr``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"'{path}' is not a dotted path like 'package.module.Name'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ImportError(f"module '{module_name}' has no attribute '{attr}'") from e


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions
    that turn ``a`` into ``b``. ``O(len(a) * len(b))`` time, ``O(len(b))`` memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def nearest(name: str, choices: list[str]) -> str | None:
    """The closest choice to ``name`` (case-insensitive), or None if nothing is close."""
    lowered = {c.lower(): c for c in choices}
    hit = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[hit[0]] if hit else None


class Registry(Generic[T]):
    """A named, case-insensitive map from keys to implementations.

    Args:
        kind: what is registered (used in error messages), e.g. ``"reward"``.

    ``base``: when set (after the base class exists), a dotted plugin path must name a subclass of it.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self.base: type | None = None

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | T | str:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""
        key = name.lower()

        def add(o: T | str):
            old = self._entries.get(key)
            lazy_twin = isinstance(old, str) and old == f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', '')}"
            if old is not None and old is not o and not lazy_twin:
                raise RegistryError(
                    f"{self.kind} '{name}' is already registered "
                    f"(to {old!r}); pick another name."
                )
            self._entries[key] = o
            return o

        if obj is not None:
            return add(obj)
        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """Look ``name`` up, importing a lazily registered dotted path on first use."""
        key = name.lower()
        if key in self._entries:
            entry = self._entries[key]
            if isinstance(entry, str):
                entry = import_dotted(entry)  # type: ignore[assignment]
                self._entries[key] = entry
            return entry  # type: ignore[return-value]
        if "." in name:
            try:
                found = import_dotted(name)
            except ImportError as e:
                raise RegistryError(
                    f"{self.kind} '{name}' looks like a plugin path but could not be imported: {e}"
                ) from e
            if self.base is not None and not (isinstance(found, type) and issubclass(found, self.base)):
                raise RegistryError(
                    f"{self.kind} '{name}' is {found!r}, not a subclass of {self.base.__module__}."
                    f"{self.base.__qualname__}. Fix: point it at your subclass of {self.base.__qualname__} "
                    f"(docs/extending.md).")
            return found  # type: ignore[return-value]
        hint = nearest(name, self.names())
        did_you_mean = f" Did you mean '{hint}'?" if hint else ""
        raise RegistryError(
            f"unknown {self.kind} '{name}'.{did_you_mean} Registered: {', '.join(self.names())}. "
            f"A plugin can also be given as a dotted path 'package.module.Class'."
        )
