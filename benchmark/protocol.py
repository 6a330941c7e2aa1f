"""The OSSL protocol as data (SPEC section 1).

* ID ("known") classes: the first ceil(C/2) classes of the canonical order; the rest are OOD.
* Labeled set: ``shots`` training images per ID class, sampled per seed (Dassl convention: one
  ``random.sample`` per class, classes in label order, from a generator seeded with the seed).
* Unlabeled pool: every training image, ID and OOD, labeled ones included (IOMatch convention).
* Test: ID test images (closed-set accuracy) and ID + OOD test images with OOD relabelled K (BA).

Each (dataset, shots, seed) split is a JSON manifest of sample ids with a content hash, written once
under ``<results>/splits/`` and reused by every method; every result records its hash.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

from .data import DatasetPlugin, Split, sha256_json
from .errors import DatasetError
from .integrity import quarantine, read_json
from .io import atomic_write_text

PROTOCOL_VERSION = 1


def num_known(num_classes: int) -> int:
    return math.ceil(num_classes / 2)


@dataclass
class OSSLSplit:
    manifest: Dict
    train: Split
    test: Split
    id_classnames: List[str]  # the K known class names: all a method ever sees of class names
    labeled_idx: np.ndarray  # indices into ``train``
    labeled_y: np.ndarray
    unlabeled_idx: np.ndarray  # indices into ``train``
    test_idx: np.ndarray  # indices into ``test`` (ID + OOD)
    test_y_open: np.ndarray  # labels in [0, K]; K = unknown

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def K(self) -> int:
        return len(self.id_classnames)


def build_manifest(name: str, classnames: List[str], train: Split, test: Split,
                   shots: int, seed: int) -> Dict:
    C = len(classnames)
    K = num_known(C)
    rng = random.Random(seed)
    labeled: List[List] = []
    for c in range(K):
        # canonical order (ids sorted): the sample depends on the images, not on the order the
        # dataset's layout listed them in (CoOp's split JSON vs the official annotation files)
        members = sorted(train.ids[i] for i in np.flatnonzero(train.labels == c))
        if len(members) < shots:
            raise DatasetError(
                f"{name}: class {c} ({classnames[c]!r}) has only {len(members)} training images, "
                f"fewer than shots={shots}. Use fewer shots or a larger training split.")
        labeled += [[sid, c] for sid in rng.sample(members, shots)]
    body = {
        "protocol_version": PROTOCOL_VERSION,
        "dataset": name,
        "shots": int(shots),
        "seed": int(seed),
        "num_classes": C,
        "num_known": K,
        "known_classnames": classnames[:K],
        "train_fingerprint": canonical_fingerprint(train),
        "test_fingerprint": canonical_fingerprint(test),
        "labeled": labeled,
        "unlabeled": "all train images (ID + OOD, labeled included)",
        "num_unlabeled": len(train),
        "num_test_id": int((test.labels < K).sum()),
        "num_test_ood": int((test.labels >= K).sum()),
    }
    body["hash"] = sha256_json(body)
    return body


def canonical_fingerprint(split: Split) -> str:
    """:meth:`Split.fingerprint` of the samples in canonical order (sorted ids): the same samples
    listed in another order give the same fingerprint (equal to the plain one when the split is
    already sorted, as the embedded datasets and the real-data plugins are)."""
    order = sorted(range(len(split.ids)), key=split.ids.__getitem__)
    if order == list(range(len(split.ids))):
        return split.fingerprint()
    return Split(ids=[split.ids[i] for i in order], labels=split.labels[order], loader=split.loader).fingerprint()


MANIFEST_KEYS = ("hash", "labeled", "num_known", "known_classnames")


def read_manifest(path: Path):
    """``(manifest, why)``: the split manifest at ``path`` and None, ``(None, why it cannot be read
    back)``, or ``(None, None)`` when there is none."""
    return read_json(path, MANIFEST_KEYS) if path.exists() else (None, None)


def manifest_problem(results_dir: Path, dataset: str, shots: int, seed: int, eval_split: str = "test"):
    """``(path, why)`` when the split manifest exists but cannot be read back, else None."""
    path = manifest_path(results_dir, dataset, shots, seed, eval_split)
    why = read_manifest(path)[1]
    return (path, why) if why else None


def manifest_path(results_dir: Path, dataset: str, shots: int, seed: int, eval_split: str = "test") -> Path:
    tail = "" if eval_split == "test" else f"_{eval_split}"
    return Path(results_dir) / "splits" / dataset / f"shots{shots}_seed{seed}{tail}.json"


def load_or_create(plugin: DatasetPlugin, shots: int, seed: int, results_dir: Path,
                   eval_split: str = "test") -> OSSLSplit:
    """The run's split. ``eval_split``: the held-out split that plays the test role ("test", or
    "val" for tuning on a plugin that serves one; the labeled set and the unlabeled pool are the same
    either way, both drawn from "train")."""
    if eval_split == "train" or eval_split not in plugin.splits:
        held_out = [s for s in plugin.splits if s != "train"]
        raise DatasetError(f"eval.split={eval_split!r}: dataset {plugin.name!r} serves the held-out "
                           f"split(s) {held_out}; use one of them (only the embedded synthetic "
                           f"datasets have a 'val' split)")
    train, test = plugin.load("train"), plugin.load(eval_split)
    classnames = plugin.classnames()
    C = len(classnames)
    for split, sname in ((train, "train"), (test, "test")):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= C):
            raise DatasetError(f"{plugin.name}: {sname} labels must lie in [0, {C}) for {C} classes")
    path = manifest_path(results_dir, plugin.name, shots, seed, eval_split)
    fresh = build_manifest(plugin.name, classnames, train, test, shots, seed)
    manifest, bad = read_manifest(path)
    if bad:  # truncated or unparsable: set aside (never deleted) and written again from the data
        quarantine(path, bad, then="a new manifest is written from the dataset")
    if eval_split != "test":  # test manifests keep the content (and hash) they always had
        fresh = {k: v for k, v in fresh.items() if k != "hash"}
        fresh["eval_split"] = eval_split
        fresh["hash"] = sha256_json(fresh)
    if manifest is not None:
        stored_hash = manifest.get("hash")
        body = {k: v for k, v in manifest.items() if k != "hash"}
        if sha256_json(body) != stored_hash:
            raise DatasetError(f"split manifest {path} is corrupted (its content hash does not match). "
                               f"Delete it to regenerate; results that recorded it must be rerun.")
        if manifest != fresh:
            raise DatasetError(
                f"split manifest {path} (hash {stored_hash[:12]}) no longer matches dataset "
                f"{plugin.name!r} on disk (hash would be {fresh['hash'][:12]}): the data or the "
                f"sampling changed. Move the manifest away to regenerate it; runs that used it must "
                f"be rerun.")
    else:
        manifest = fresh
        atomic_write_text(path, json.dumps(manifest, indent=1))
    return from_manifest(manifest, plugin, train, test)


def from_manifest(manifest: Dict, plugin: DatasetPlugin, train: Split, test: Split) -> OSSLSplit:
    K = manifest["num_known"]
    pos = {sid: i for i, sid in enumerate(train.ids)}
    labeled_idx = np.array([pos[sid] for sid, _ in manifest["labeled"]], dtype=np.int64)
    labeled_y = np.array([c for _, c in manifest["labeled"]], dtype=np.int64)
    assert (train.labels[labeled_idx] == labeled_y).all()
    return OSSLSplit(
        manifest=manifest, train=train, test=test,
        id_classnames=list(manifest["known_classnames"]),
        labeled_idx=labeled_idx, labeled_y=labeled_y,
        unlabeled_idx=np.arange(len(train), dtype=np.int64),
        test_idx=np.arange(len(test), dtype=np.int64),
        test_y_open=np.minimum(test.labels, K).astype(np.int64),
    )
