"""Stanford Dogs (``stanford_dogs``): 120 breeds, 12,000 train / 8,580 test images.

Where it is looked for under ``--data-root``: ``stanford_dogs/``, ``StanfordDogs/``,
``Stanford_Dogs/``, ``stanford-dogs/``, ``dogs/``, then the root itself. Layouts:

* official archive (``images.tar`` -> ``Images/<wnid>-<name>/``, ``lists.tar`` ->
  ``train_list.mat``, ``test_list.mat``, beside ``Images/`` or in ``lists/``). Train (the unlabeled
  pool) = ``train_list.mat``; class order = its label index (1-based in the file), which is the
  sorted WordNet folder order.
* CoOp/Dassl style: ``split_zhou_StanfordDogs.json`` (CoOp ships no Dogs split; the name its forks
  use) beside ``Images/``, paths relative to the folder or to ``Images/``; pool = train + val.

Class names: the folder name after the first ``-`` ("n02085620-Chihuahua" -> "Chihuahua"), with
``_`` replaced by spaces ("Japanese_spaniel" -> "Japanese spaniel") [default; dataset option
``underscores: keep`` keeps them], in both layouts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from benchmark.errors import ConfigError, DatasetError
from benchmark.registry import register_dataset

from ._real import Index, Layout, RealDataset, coop_index, loadmat, mat_str

TRAIN = ("train_list.mat", "lists/train_list.mat")
TEST = ("test_list.mat", "lists/test_list.mat")


@register_dataset("stanford_dogs")
class StanfordDogs(RealDataset):
    """Stanford Dogs, 120 breeds (official lists or CoOp-style split JSON)."""

    title = "Stanford Dogs"
    description = "Stanford Dogs, 120 breeds (60 ID + 60 OOD), 12,000 train / 8,580 test"
    template = "a photo of a {}, a type of dog."  # CoOp has no Dogs entry: SPEC section 3 [default]
    folder_names = ("stanford_dogs", "StanfordDogs", "Stanford_Dogs", "stanford-dogs", "dogs")
    official_sizes = (120, 12000, 8580)
    # underscores: "space" (default, [default]) or "keep" in the folder-derived class names
    extra_options = {"underscores": "space"}
    layouts = (
        Layout("official", "Images/<wnid>-<breed>/ and train_list.mat, test_list.mat (beside Images/ or "
               "in lists/; the extracted images.tar and lists.tar)",
               (("Images/",), TRAIN, TEST)),
        Layout("coop", "split_zhou_StanfordDogs.json (CoOp split format) and Images/",
               (("split_zhou_StanfordDogs.json",), ("Images/",))),
    )

    def __init__(self, root=None, **options):
        super().__init__(root, **options)
        if self.options["underscores"] not in ("space", "keep"):
            raise ConfigError(f"stanford_dogs: underscores must be space or keep, got "
                              f"{self.options['underscores']!r}")

    def breed(self, folder_name: str) -> str:
        if "-" not in folder_name:
            raise DatasetError(f"Stanford Dogs folder {folder_name!r} is not of the form <wnid>-<breed>")
        name = folder_name.split("-", 1)[1]
        return name.replace("_", " ") if self.options["underscores"] == "space" else name

    def read(self, folder: Path, layout: Layout) -> Index:
        folders: Dict[int, str] = {}

        def note(lab: int, sid: str, where) -> None:
            parts = sid.split("/")
            if len(parts) < 2:
                raise DatasetError(f"{where}: image path {sid!r} has no breed folder")
            if folders.setdefault(lab, parts[-2]) != parts[-2]:
                raise DatasetError(f"{where}: label {lab + 1 if layout.name == 'official' else lab} is "
                                   f"used by two folders, {folders[lab]!r} and {parts[-2]!r}")

        if layout.name == "coop":
            idx = coop_index(folder, folder / "split_zhou_StanfordDogs.json", ("Images",))
            for s in ("train", "test"):
                for sid, lab in zip(*idx.splits[s]):
                    note(int(lab), sid, idx.notes["split_file"])
            idx.classnames = [self.breed(folders[c]) for c in range(len(idx.classnames))]
            return idx
        splits = {}
        for s, alts in (("train", TRAIN), ("test", TEST)):
            path = layout.find(folder, alts)
            m = loadmat(path)
            if "file_list" not in m or "labels" not in m:
                raise DatasetError(f"{path} needs 'file_list' and 'labels' variables")
            files = [mat_str(x) for x in np.asarray(m["file_list"]).reshape(-1)]
            labels = np.asarray(m["labels"]).reshape(-1).astype(np.int64) - 1
            if len(files) != len(labels):
                raise DatasetError(f"{path}: {len(files)} files but {len(labels)} labels")
            ids = [f"Images/{f}" for f in files]
            for sid, lab in zip(ids, labels.tolist()):
                note(lab, sid, path)
            splits[s] = (ids, labels)
        C = max(folders) + 1
        if sorted(folders) != list(range(C)):
            raise DatasetError(f"{folder}: the list files' labels must be 1..C without gaps")
        return Index(folder=folder, layout="official", classnames=[self.breed(folders[c]) for c in range(C)],
                     splits=splits, image_base=folder)
