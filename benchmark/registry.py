"""Plugin registries for methods and datasets.

Plugins are plain ``.py`` files in the top-level ``methods/`` and ``datasets/`` folders. Those folders
are deliberately *not* importable as top-level packages ``methods``/``datasets`` (a package called
``datasets`` would shadow Hugging Face's library): they are mounted under the aliases
``ossl_methods`` and ``ossl_datasets`` instead, so a plugin can import a shared helper with a
relative import (``from ._prompts import PromptLearner``). Files whose name starts with ``_`` are
helpers and are not scanned. Extra plugin folders can be given with the environment variable
``OSSL_PLUGIN_PATH`` (``os.pathsep``-separated folders, each holding ``methods/`` and/or
``datasets/``).
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Callable, Dict, Generic, List, TypeVar

from . import ROOT
from .errors import DuplicateNameError, PluginImportError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, folder: str, alias: str, roots: List[Path] | None = None):
        self.kind = kind
        self.roots = roots  # None: the suite's root plus OSSL_PLUGIN_PATH
        self.folder = folder
        self.alias = alias
        self._items: Dict[str, T] = {}
        self._discovered = False

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None)
            if not key:
                raise ValueError(f"{self.kind} {obj!r} has no name: pass register('name')")
            existing = self._items.get(key)
            if existing is not None and existing is not obj:
                raise DuplicateNameError(
                    f"{self.kind} name {key!r} is registered twice: by {_where(existing)} and by "
                    f"{_where(obj)}. Rename one of them.")
            self._items[key] = obj
            try:
                obj.name = key  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj
        return deco

    def unregister(self, name: str) -> None:
        """Remove a registration (for tests and interactive use)."""
        self._items.pop(name, None)

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        self.discover()
        if name not in self._items:
            raise UnknownNameError(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> List[str]:
        self.discover()
        return sorted(self._items)

    def items(self):
        self.discover()
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._items

    # -- discovery ----------------------------------------------------------------------------
    def folders(self) -> List[Path]:
        if self.roots is not None:
            return [Path(r) / self.folder for r in self.roots if (Path(r) / self.folder).is_dir()]
        dirs = [ROOT / self.folder]
        for extra in filter(None, os.environ.get("OSSL_PLUGIN_PATH", "").split(os.pathsep)):
            d = Path(extra) / self.folder
            if d.is_dir():
                dirs.append(d.resolve())
        return dirs

    def discover(self) -> None:
        """Import every plugin file once. A plugin that fails to import is a loud error."""
        if self._discovered:
            return
        self._discovered = True
        pkg = sys.modules.get(self.alias)
        if pkg is None:
            pkg = types.ModuleType(self.alias)
            pkg.__path__ = []  # type: ignore[attr-defined]
            sys.modules[self.alias] = pkg
        for folder in self.folders():
            if str(folder) not in pkg.__path__:
                pkg.__path__.append(str(folder))  # type: ignore[attr-defined]
        importlib.invalidate_caches()
        for folder in self.folders():
            for path in sorted(folder.glob("*.py")):
                if path.name.startswith("_"):
                    continue
                modname = f"{self.alias}.{path.stem}"
                if modname in sys.modules:
                    continue
                try:
                    importlib.import_module(modname)
                except Exception as exc:  # noqa: BLE001 - re-raised with context
                    self._discovered = False
                    sys.modules.pop(modname, None)
                    raise PluginImportError(
                        f"{self.kind} plugin {path} failed to import: {type(exc).__name__}: {exc}\n"
                        f"Fix the file or move it out of {folder}. Traceback:\n"
                        f"{traceback.format_exc()}") from exc


def _where(obj) -> str:
    mod = getattr(obj, "__module__", "?")
    return f"{mod}.{getattr(obj, '__qualname__', repr(obj))}"


METHODS: Registry = Registry("method", "methods", "ossl_methods")
DATASETS: Registry = Registry("dataset", "datasets", "ossl_datasets")
register_method = METHODS.register
register_dataset = DATASETS.register
