"""Error types with messages that say what was expected and how to fix it."""
from __future__ import annotations

import difflib
from typing import Iterable


class BenchmarkError(Exception):
    """Base class of every error the suite raises on bad input."""


class UnknownNameError(BenchmarkError, KeyError):
    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known) or '(none)'}."
        super().__init__(msg)
        self.msg = msg

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.msg


class DuplicateNameError(BenchmarkError):
    pass


class PluginImportError(BenchmarkError):
    pass


class ConfigError(BenchmarkError):
    pass


class DatasetError(BenchmarkError):
    pass


class ResultExistsError(BenchmarkError):
    pass


class RunLockedError(BenchmarkError):
    """Another live process holds the run's lock (it is running that run now)."""

    def __init__(self, folder, pid: int):
        super().__init__(f"{folder} is being run by process {pid}")
        self.folder, self.pid = folder, pid


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.0)
    return close[0] if close else None
