"""Name -> object registries for systems, models and tasks.

Why a registry instead of an ``if name == ...`` ladder: adding a model must not mean editing the
CLI, and third-party packages must be able to add models without touching eqbench at all.

Why lazy entries: ``eqbench list`` and ``eqbench describe`` should answer instantly and never
import torch for eqbench's own entries, so built-ins are registered as ``"package.module:attr"``
strings with their description and only imported by :meth:`Registry.get`. Plugins declared
under an entry-point group (``eqbench.models``, ``eqbench.tasks``) are discovered on first use
without being imported; an entry point carries no description, so :meth:`Registry.entries`
(what ``eqbench list`` shows) loads each plugin's target once to read it (the ``description``
that :func:`eqbench.capabilities.model_builder` sets, else the docstring's first line). A plugin
that is broken is reported (a warning while listing, a one-line
:class:`~eqbench.errors.EqbenchError` when asked for), never a crash of the whole tool.

Anything with a ``:`` that is not a registered name is a direct ``"module:attr"`` path, so
``--model mypkg.flows:build`` works without registering anything.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, overload

from eqbench.errors import EqbenchError, UnknownNameError

__all__ = ["Entry", "PluginWarning", "Registry", "SYSTEMS", "MODELS", "TASKS"]

T = TypeVar("T")
_F = TypeVar("_F")


class PluginWarning(UserWarning):
    """A plugin skipped while listing; a category of its own so users can filter it."""


@dataclass(frozen=True)
class Entry:
    """What ``eqbench list`` shows for one name, known without importing the target.

    ``target`` is ``"module:attr"``; ``origin`` is ``"eqbench"`` for built-ins,
    ``"plugin <distribution>"`` for entry points and the defining module otherwise.
    """

    name: str
    target: str
    origin: str
    description: str = ""


def _origin_of(module: str) -> str:
    """``eqbench`` for built-ins; anything else keeps its module so users can find it."""
    return "eqbench" if module == "eqbench" or module.startswith("eqbench.") else module


def _split_target(target: str) -> tuple[str, str]:
    """Split and validate ``"module:attr"`` (attr may be dotted, e.g. ``Class.method``)."""
    module, sep, attr = target.partition(":")
    if not sep or not module.strip() or not attr.strip() or ":" in attr:
        raise ValueError(f"lazy target must look like 'package.module:attr', got {target!r}")
    return module.strip(), attr.strip()


def _import_target(target: str) -> Any:
    """Import ``"module:attr"`` and walk the (possibly dotted) attribute path."""
    module_name, attr = _split_target(target)
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _one_line(exc: BaseException) -> str:
    """The CLI prints EqbenchError as one line, so collapse multi-line foreign messages."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _first_doc_line(obj: object) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def _description_of(obj: object) -> str:
    """What ``list`` shows for a loaded object: its ``description`` (as
    :func:`eqbench.capabilities.model_builder` sets it), else its docstring's first line."""
    description = getattr(obj, "description", None)
    if isinstance(description, str) and description.strip():
        return " ".join(description.split())
    return _first_doc_line(obj)


class Registry(Generic[T]):
    """One namespace of names (``kind`` is "model", "task" or "system") mapped to lazy objects.

    Registered entries (decorator or lazy string) take precedence over entry-point plugins of the
    same name, because a third-party package must not be able to silently replace a built-in.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._registered: dict[str, Entry] = {}
        self._plugins: dict[str, Entry] = {}
        self._cache: dict[str, T] = {}
        self._described: set[str] = set()
        self._discovered = entry_point_group is None

    def __repr__(self) -> str:
        group = f", entry_point_group={self.entry_point_group!r}" if self.entry_point_group else ""
        return f"Registry({self.kind!r}{group})"

    # -- registration ---------------------------------------------------------------------------

    @overload
    def register(
        self, name: str, target: None = None, *, description: str = ""
    ) -> Callable[[_F], _F]: ...

    @overload
    def register(self, name: str, target: str, *, description: str = "") -> None: ...

    @overload
    def register(self, name: str, target: _F, *, description: str = "") -> _F: ...

    def register(self, name: str, target: Any = None, *, description: str = "") -> Any:
        """Register ``name``: as a decorator, with an object, or lazily with ``"module:attr"``.

        ``@MODELS.register("kernel-flow")`` returns the decorated object unchanged;
        ``MODELS.register("kernel-flow", "eqbench.flows.kernel_flow:build")`` imports nothing
        until :meth:`get`. Registering a name twice raises ``ValueError``: two definitions
        of one name is a bug, and silently keeping either would hide it.
        """
        if target is None:

            def decorator(obj: _F) -> _F:
                self._add_object(name, obj, description)
                return obj

            return decorator
        if isinstance(target, str):
            _split_target(target)
            self._add(
                Entry(name, target, _origin_of(target.partition(":")[0].strip()), description)
            )
            return None
        self._add_object(name, target, description)
        return target

    def _add_object(self, name: str, obj: Any, description: str) -> None:
        module = getattr(obj, "__module__", None) or type(obj).__module__
        qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        entry = Entry(
            name, f"{module}:{qualname}", _origin_of(module), description or _first_doc_line(obj)
        )
        self._add(entry)
        self._cache[name] = obj

    def _add(self, entry: Entry) -> None:
        name = entry.name
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            raise ValueError(
                f"{self.kind} name must be a non-empty string without ':' or surrounding spaces, "
                f"got {name!r} (':' is reserved for direct 'module:attr' paths)"
            )
        if name in self._registered:
            raise ValueError(
                f"{self.kind} {name!r} is already registered "
                f"(target {self._registered[name].target}); choose another name"
            )
        if name in self._plugins:
            shadowed = self._plugins.pop(name)
            self._cache.pop(name, None)
            warnings.warn(
                f"{self.kind} {name!r} from {shadowed.origin} ({shadowed.target}) is shadowed by "
                f"{entry.target}; registered entries take precedence over plugins",
                PluginWarning,
                stacklevel=4,
            )
        self._registered[name] = entry

    # -- entry-point discovery ------------------------------------------------------------------

    def _discover(self) -> None:
        """Record entry points as lazy entries once, importing none of them.

        A failure here (broken metadata, name clash) is a warning and that plugin is skipped:
        one bad third-party package must not break ``eqbench list`` for everything else.
        """
        if self._discovered:
            return
        self._discovered = True
        assert self.entry_point_group is not None
        try:
            eps = importlib.metadata.entry_points(group=self.entry_point_group)
        except Exception as exc:  # metadata of any installed distribution may be malformed
            warnings.warn(
                f"cannot list {self.kind} plugins of group {self.entry_point_group!r}: "
                f"{_one_line(exc)}",
                PluginWarning,
                stacklevel=4,
            )
            return
        for ep in eps:
            try:
                self._add_plugin(ep)
            except Exception as exc:
                warnings.warn(
                    f"skipping {self.kind} plugin {getattr(ep, 'name', '?')!r}: {_one_line(exc)}",
                    PluginWarning,
                    stacklevel=4,
                )

    def _add_plugin(self, ep: importlib.metadata.EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        dist_name = getattr(dist, "name", None) if dist is not None else None
        origin = f"plugin {dist_name}" if dist_name else "plugin"
        target = f"{ep.module}:{ep.attr}" if ep.attr else ""
        if not target:
            raise ValueError(f"entry point value {ep.value!r} must be 'module:attr'")
        _split_target(target)
        if not ep.name or ":" in ep.name:
            raise ValueError(f"invalid {self.kind} name {ep.name!r}")
        if ep.name in self._registered:
            raise ValueError(
                f"{origin} ({target}) clashes with the registered {self.kind} "
                f"({self._registered[ep.name].target}), which takes precedence"
            )
        previous = self._plugins.get(ep.name)
        if previous is not None:
            if previous.target != target:
                raise ValueError(
                    f"{origin} ({target}) clashes with {previous.origin} ({previous.target})"
                )
            return
        self._plugins[ep.name] = Entry(ep.name, target, origin, "")

    # -- lookup ---------------------------------------------------------------------------------

    def _all(self) -> dict[str, Entry]:
        self._discover()
        return {**self._plugins, **self._registered}

    def entries(self, *, describe_plugins: bool = True) -> list[Entry]:
        """All entries sorted by name, as ``eqbench list`` shows them.

        Built-ins are never imported (their descriptions are registered with them). An entry
        point has no description, so with ``describe_plugins`` (the default) each plugin's target
        is loaded once to read it (:func:`_description_of`); a plugin that fails to load is
        listed all the same, with a :class:`PluginWarning` giving the one-line reason.
        ``describe_plugins=False`` imports nothing at all.

        Example:
            >>> reg = Registry("model")
            >>> reg.register("gaussian", "eqbench.flows.gaussian:build", description="baseline")
            >>> [(e.name, e.description) for e in reg.entries()]
            [('gaussian', 'baseline')]
        """
        if describe_plugins:
            self._discover()
            for name in sorted(self._plugins):
                self._describe_plugin(name)
        return [entry for _, entry in sorted(self._all().items())]

    def _describe_plugin(self, name: str) -> None:
        """Fill in a plugin entry's description by loading its target (once; failures warn once)."""
        entry = self._plugins[name]
        if entry.description or name in self._described:
            return
        self._described.add(name)
        try:
            obj = self.get(name)
        except EqbenchError as exc:
            warnings.warn(f"{exc}; listed without a description", PluginWarning, stacklevel=3)
            self._plugins[name] = replace(entry, description="(fails to load: see the warning)")
            return
        self._plugins[name] = replace(entry, description=_description_of(obj))

    def names(self) -> list[str]:
        """Sorted registered and plugin names (direct ``module:attr`` paths are not listed)."""
        return sorted(self._all())

    def entry(self, name: str) -> Entry:
        """The :class:`Entry` for ``name`` without importing it; raises UnknownNameError."""
        entries = self._all()
        if name not in entries:
            raise UnknownNameError(self.kind, name, entries)
        return entries[name]

    def get(self, name: str) -> T:
        """Resolve ``name`` to its object, importing a lazy target on first use and caching it.

        A registered built-in that fails to import is a bug in eqbench and keeps its traceback;
        plugins and direct paths are user input, so their failures become one-line EqbenchErrors
        (chained, so ``--debug`` style tracebacks still show the cause).
        """
        if name in self._cache:
            return self._cache[name]
        entries = self._all()
        entry = entries.get(name)
        if entry is None:
            if ":" not in name:
                raise UnknownNameError(self.kind, name, entries)
            try:
                _split_target(name)
            except ValueError as exc:
                raise EqbenchError(
                    f"invalid {self.kind} path {name!r}: expected 'package.module:attr'"
                ) from exc
            obj = self._load_foreign(name, f"{self.kind} {name!r}")
        elif name in self._plugins:
            obj = self._load_foreign(
                entry.target, f"{self.kind} {name!r} from {entry.origin} ({entry.target})"
            )
        else:
            obj = _import_target(entry.target)
        self._cache[name] = obj
        return obj

    @staticmethod
    def _load_foreign(target: str, what: str) -> Any:
        try:
            return _import_target(target)
        except Exception as exc:  # third-party code may fail in any way; report it, don't crash
            raise EqbenchError(f"cannot load {what}: {_one_line(exc)}") from exc

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._all())


SYSTEMS: Registry[Any] = Registry("system")
MODELS: Registry[Any] = Registry("model", "eqbench.models")
TASKS: Registry[Any] = Registry("task", "eqbench.tasks")
