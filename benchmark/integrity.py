"""Damaged files: detection, quarantine and the log's idempotence across resumes.

A run's files are written atomically (:mod:`benchmark.io`), so a crash never leaves half a file;
a disk that fills up, a copy cut short or a flipped bit still can. Every file the suite reads back
is checked here before it is trusted:

* ``result.json``: valid JSON holding the keys a table needs;
* ``predictions.npz``, ``patches.npz``, ``learned.pt``, ``checkpoint.pt``: zip archives (numpy's
  ``.npz`` and torch's default format both are) whose every member passes its CRC-32 check
  (:meth:`zipfile.ZipFile.testzip`: no unpickling, so checking a checkpoint is cheap);
* a split manifest: valid JSON.

A damaged file is never deleted: :func:`quarantine` renames it ``<name>.damaged-<timestamp>``
beside the original and says so, and the run is redone by the next ``run_all.py``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

from .io import atomic_write_text

# what a result.json must hold for the tables, the summary and the status
RESULT_KEYS = ("metrics", "config_hash", "split_hash", "cost", "method", "dataset", "shots", "seed")
# a finished run's files beside result.json; (name, required)
FINISHED_FILES = (("predictions.npz", True), ("learned.pt", False), ("patches.npz", False))

Problem = Tuple[Path, str]  # (file, why it is damaged)


def read_json(path: Path, keys: Tuple[str, ...] = ()) -> Tuple[Optional[dict], Optional[str]]:
    """``(the JSON object at path, None)`` when it is usable (holds ``keys``), else ``(None, why
    not)``: the file is read and parsed once, for the check and for the caller."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON (truncated or corrupt: {exc})"
    except OSError as exc:
        return None, f"unreadable ({exc})"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    missing = [k for k in keys if k not in data]
    if missing:
        return None, f"incomplete: no {', '.join(missing)}"
    return data, None


def check_zip(path: Path) -> Optional[str]:
    """Why ``path`` is not an intact zip archive (``.npz``, torch checkpoints); None when it is."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every member and checks its CRC-32
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"not a complete archive (truncated or corrupt: {exc})"
    except OSError as exc:
        return f"unreadable ({exc})"
    if bad is not None:
        return f"corrupt: member {bad!r} fails its CRC check"
    return None


def inspect_run(d: Path) -> List[Problem]:
    """The damaged files of the run folder ``d`` (empty when every present file is intact; a
    missing ``predictions.npz`` beside a ``result.json`` counts as damage)."""
    return read_run(d)[1]


def read_run(d: Path) -> Tuple[Optional[dict], List[Problem]]:
    """``(result, problems)`` of the run folder ``d``: its parsed ``result.json`` (None when absent
    or damaged) and its damaged files as :func:`inspect_run` lists them, each file read once."""
    d = Path(d)
    problems: List[Problem] = []
    result = None
    res = d / "result.json"
    if res.exists():
        result, why = read_json(res, RESULT_KEYS)
        if why:
            problems.append((res, why))
        for name, required in FINISHED_FILES:
            p = d / name
            if p.exists():
                why = check_zip(p)
                if why:
                    problems.append((p, why))
            elif required:
                problems.append((p, "missing beside result.json (the run's predictions)"))
    ck = d / "checkpoint.pt"
    if ck.exists():
        why = check_zip(ck)
        if why:
            problems.append((ck, why))
    return result, problems


def quarantine(path: Path, why: str, log=None, then: str = "") -> Path:
    """Rename a damaged file to ``<name>.damaged-<timestamp>`` beside it (never deleted)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.replace(path, target)
    msg = f"damaged file {path}: {why}; moved to {target.name}" + (f"; {then}" if then else "")
    (log or (lambda m: print(m, file=sys.stderr)))(msg)
    return target


def heal_run(d: Path, archive, log=None) -> Tuple[Optional[dict], List[Problem]]:
    """Quarantine the damaged files of run folder ``d``. If the run had finished (a result.json,
    intact or not), its remaining files are moved away with ``archive(d)`` so that the redone run
    never overwrites them. Returns ``(result, problems)``: the parsed ``result.json`` still in place
    (None when there is none or it was moved away) and the problems found."""
    result, problems = read_run(d)
    if not problems:
        return result, problems
    for p, why in problems:
        if p.exists():
            quarantine(p, why, log, then="the run is redone")
    if any(p.name != "checkpoint.pt" for p, _ in problems):
        archive(d)
        result = None
    return result, problems


def trim_log(path: Path, start: int) -> None:
    """Keep only the records of steps ``<= start`` in a run's ``log.jsonl`` (and drop a line cut
    short by a kill), so that a run resumed from step ``start`` logs every step exactly once."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= start:
            kept.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in kept))


def load_checkpoint(path: Path, log=None):
    """``torch.load`` of a run's checkpoint; a damaged one is quarantined and None returned (the
    run then starts over), as is a missing one."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    why = check_zip(path)
    if why is None:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            why = f"unreadable ({type(exc).__name__}: {exc})"
    quarantine(path, why, log, then="the run starts over")
    return None
