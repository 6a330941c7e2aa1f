"""Dataset plugin API.

A dataset plugin is a subclass of :class:`DatasetPlugin` registered with
``@register_dataset("name")`` in a file of ``datasets/``. It gives the canonical class order, the
zero-shot template and two :class:`Split` objects (train, test). The OSSL protocol (which classes are
ID, which images are labeled) is *not* the plugin's business: :mod:`benchmark.protocol` derives it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image


@dataclass
class Split:
    """Images of one split. ``ids`` are stable, unique strings (relative paths for real data)."""

    ids: List[str]
    labels: np.ndarray  # int64, canonical class index in [0, C)
    loader: Callable[[int], Image.Image]  # loader(i) -> RGB PIL image of sample i
    # how the pixels are produced when the ids alone do not say it (e.g. a resized image cache):
    # part of the frozen-feature cache key, not of the split fingerprint (the samples are the same)
    variant: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{len(self.ids)} ids but {len(self.labels)} labels")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("sample ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> Image.Image:
        return self.loader(i)

    def fingerprint(self) -> str:
        """Hash of the (id, label) content, so a manifest can detect a changed dataset."""
        h = hashlib.sha256()
        for sid, lab in zip(self.ids, self.labels.tolist()):
            h.update(f"{sid}\t{lab}\n".encode())
        return h.hexdigest()


class DatasetPlugin:
    """Base class of dataset plugins.

    Subclasses set ``template`` (zero-shot prompt with one ``{}``) and implement
    :meth:`classnames` and :meth:`load`. ``needs_root`` tells the runner whether ``--data-root``
    is required. ``options`` come from the experiment YAML (``dataset_options``).
    """

    name: ClassVar[str] = ""
    template: ClassVar[str] = "a photo of a {}."
    needs_root: ClassVar[bool] = True
    # a short description for ``run_all.py --list``
    description: ClassVar[str] = ""
    # declared range of each numeric option (checked before a run, see benchmark/checks.py):
    # "[1, inf)", or ("[1, inf)", True) for whole numbers (a third element: the words that switch
    # the option off, e.g. ("off", "none"))
    option_ranges: ClassVar[Dict[str, object]] = {}
    # the splits :meth:`load` serves; a plugin that can serve a validation split (disjoint from
    # train and test, drawn like test) adds "val", which runs with ``eval.split: val`` evaluate on
    splits: ClassVar[Tuple[str, ...]] = ("train", "test")

    def __init__(self, root: Optional[Path] = None, **options):
        self.root = Path(root) if root is not None else None
        self.options = options

    def classnames(self) -> List[str]:
        raise NotImplementedError

    def load(self, split: str) -> Split:
        """Return the ``"train"`` or ``"test"`` split (or another name in ``splits``)."""
        raise NotImplementedError

    def num_classes(self) -> int:
        return len(self.classnames())

    def labels(self, split: str) -> np.ndarray:
        """The labels of a split (what ``--dry-run`` checks); plugins that can give them without
        producing the images may override this."""
        return self.load(split).labels


def pil_from_array(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
