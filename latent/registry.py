"""One registry helper for everything built by name: models, adapters, noise schedules, sampler parts, tasks.

    SCHEDULES = Registry("noise schedule")

    @SCHEDULES.register("linear")
    class Linear: ...

    SCHEDULES.create("linear", **kwargs)   # build by name
    SCHEDULES.get("linear")                # the class (or function) itself
    SCHEDULES.names()                      # sorted names
    "linear" in SCHEDULES

A second object registered under a taken name raises; an unknown name raises a ``KeyError`` (a
``LookupError``, also a ``ValueError`` subclass here so callers that validate input can catch it as one)
naming the close matches and the known names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(KeyError, ValueError):
    """An unknown name was asked of a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0]) if self.args else ""


class Registry:
    """Name -> object.

    what: the kind of thing, for error messages ("adapter", "masking schedule", ...).
    on_miss: called once, the first time a name is missing or the names are listed (e.g. to import the
        built-in members lazily); if it raises, it runs again next time.
    name_attr: the attribute that receives the registered name on each member ("registered_name").
    hint: appended to the unknown-name error, e.g. how to register a new member; ``{name}`` in it is
        replaced by the name asked for (``{name!r}`` quoted).
    """

    def __init__(
        self,
        what: str,
        on_miss: Callable[[], None] | None = None,
        *,
        name_attr: str = "registered_name",
        hint: str = "",
    ):
        self.what = what
        self._items: dict[str, Any] = {}
        self._on_miss = on_miss
        self._name_attr = name_attr
        self._hint = hint
        self._lazy: dict[str, str] = {}  # name -> module that registers it when imported

    def register(self, name: str, *aliases: str, obj: Any = None):
        """Decorator (or direct call with ``obj=``): register under ``name`` and any ``aliases``.

        The object gets ``<name_attr> = name`` when it accepts attributes."""

        def add(item):
            keys = (name, *aliases)
            for key in keys:  # check every key before adding any, so a refused call leaves no trace
                if not isinstance(key, str) or not key:
                    raise ValueError(f"a {self.what} name must be a non-empty string, got {key!r}")
                held = self._items.get(key)
                if held is not None and held is not item:
                    raise ValueError(
                        f"a {self.what} named {key!r} is already registered "
                        f"({getattr(held, '__qualname__', held)!s}); pick another name"
                    )
            for key in keys:
                self._items[key] = item
            try:
                setattr(item, self._name_attr, name)
            except (AttributeError, TypeError):
                pass
            return item

        return add if obj is None else add(obj)

    def register_lazy(self, name: str, module: str) -> None:
        """Announce ``name`` without importing it: ``module`` registers it when imported, on first ``get``
        (so listing the names, or using one member, does not import every member's dependencies)."""
        if name in self._items or self._lazy.get(name, module) != module:
            raise ValueError(f"a {self.what} named {name!r} is already registered; pick another name")
        self._lazy[name] = module

    def unregister(self, name: str) -> None:
        """Remove a name (tests that register throw-away members clean up with it)."""
        self._items.pop(name, None)
        self._lazy.pop(name, None)

    def _import_lazy(self, name) -> None:
        module = self._lazy.get(name)
        if module is not None and name not in self._items:
            import importlib

            importlib.import_module(module)
            if name not in self._items:
                raise ImportError(f"importing {module} did not register the {self.what} {name!r}")

    def _load(self) -> None:
        hook, self._on_miss = self._on_miss, None
        if hook is not None:
            try:
                hook()
            except BaseException:
                self._on_miss = hook
                raise

    def __contains__(self, name: object) -> bool:
        if name not in self._items and name not in self._lazy:
            self._load()
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        self._load()
        return sorted({*self._items, *self._lazy})

    def items(self) -> list[tuple[str, Any]]:
        """(name, member) pairs, sorted by name; an aliased member appears once per name (lazy ones are
        imported)."""
        self._load()
        for name in list(self._lazy):
            self._import_lazy(name)
        return sorted(self._items.items())

    def get(self, name: str) -> Any:
        if name not in self:
            known = self.names()
            near = difflib.get_close_matches(str(name), known, n=3)
            maybe = f"; did you mean {', '.join(near)}?" if near else "."
            raise UnknownNameError(
                f"Unknown {self.what} {name!r}{maybe} Known {self.what} names: {', '.join(known) or 'none'}."
                + (" " + self._hint.format(name=name) if self._hint else "")
            )
        self._import_lazy(name)
        return self._items[name]

    def create(self, name: str, *args, **kwargs) -> Any:
        """Build the member registered as ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)
