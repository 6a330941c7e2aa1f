"""CUB-200-2011 (``cub``): 200 bird species, 5,994 train / 5,794 test images.

Where it is looked for under ``--data-root``: ``CUB_200_2011/``, ``cub/CUB_200_2011/``, ``cub/``,
``CUB_200_2011/CUB_200_2011/``, then the root itself. Layouts:

* official archive (``CUB_200_2011.tgz``): ``classes.txt``, ``images.txt``,
  ``image_class_labels.txt``, ``train_test_split.txt`` and ``images/``. Train (the unlabeled pool)
  = ``is_training_image == 1``; class order = ``classes.txt``.
* CoOp/Dassl style: ``split_zhou_CUB200.json`` (also ``split_zhou_CUB.json`` or ``split_CUB.json``;
  CoOp itself ships no CUB split, these are the names its forks use) beside ``images/`` or one
  folder up (``cub/split_zhou_CUB200.json`` + ``cub/CUB_200_2011/images/``), with
  ``train``/``val``/``test`` lists of ``[path, label, classname]``; paths relative to the folder, to
  ``images/`` or to the split file's folder. The pool is train + val (together the official training set); labels are the class
  order.

Class names: the folder name without its ``NNN.`` prefix, ``_`` replaced by spaces
("001.Black_footed_Albatross" -> "Black footed Albatross"), in both layouts.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from benchmark.errors import DatasetError
from benchmark.registry import register_dataset

from ._real import Index, Layout, RealDataset, coop_index, read_lines

JSON_NAMES = ("split_zhou_CUB200.json", "split_zhou_CUB.json", "split_CUB.json")
# the split file beside images/, or one folder up (forks keep it in cub/ beside CUB_200_2011/)
JSON_PLACES = JSON_NAMES + tuple(f"../{n}" for n in JSON_NAMES)


def clean_name(folder_name: str) -> str:
    return re.sub(r"^\d+\.", "", folder_name).replace("_", " ").strip()


@register_dataset("cub")
class CUB(RealDataset):
    """CUB-200-2011 birds (official archive or CoOp-style split JSON)."""

    title = "CUB-200-2011"
    description = "CUB-200-2011, 200 bird species (100 ID + 100 OOD), 5,994 train / 5,794 test"
    template = "a photo of a {}, a type of bird."  # CoOp has no CUB entry: SPEC section 3 [default]
    folder_names = ("CUB_200_2011", "cub/CUB_200_2011", "cub", "CUB_200_2011/CUB_200_2011")
    official_sizes = (200, 5994, 5794)
    layouts = (
        Layout("official", "classes.txt, images.txt, image_class_labels.txt, train_test_split.txt and "
               "images/ (the extracted CUB_200_2011.tgz)",
               (("classes.txt",), ("images.txt",), ("image_class_labels.txt",), ("train_test_split.txt",),
                ("images/",))),
        Layout("coop", f"{' or '.join(JSON_NAMES)} (CoOp split format; beside images/ or one folder up) "
               f"and images/",
               (JSON_PLACES, ("images/",))),
    )

    def read(self, folder: Path, layout: Layout) -> Index:
        if layout.name == "coop":
            def name_of(sid: str, cname: str) -> str:
                parts = sid.split("/")
                return clean_name(parts[-2]) if len(parts) >= 2 and re.match(r"^\d+\.", parts[-2]) \
                    else clean_name(cname)
            return coop_index(folder, layout.find(folder, JSON_PLACES), ("images",), name_of=name_of)
        classes = {}
        for ln in read_lines(folder / "classes.txt"):
            cid, name = ln.split(" ", 1)
            classes[int(cid)] = clean_name(name)
        order = sorted(classes)
        if order != list(range(1, len(order) + 1)):
            raise DatasetError(f"{folder / 'classes.txt'}: class ids must be 1..C")
        paths = dict(ln.split(" ", 1) for ln in read_lines(folder / "images.txt"))
        labels = {k: int(v) - 1 for k, v in (ln.split() for ln in read_lines(folder / "image_class_labels.txt"))}
        is_train = {k: v == "1" for k, v in (ln.split() for ln in read_lines(folder / "train_test_split.txt"))}
        if not (paths.keys() == labels.keys() == is_train.keys()):
            raise DatasetError(f"{folder}: images.txt, image_class_labels.txt and train_test_split.txt "
                               f"list different image ids")
        splits = {}
        for s, flag in (("train", True), ("test", False)):
            keys = sorted((k for k in paths if is_train[k] == flag), key=int)
            splits[s] = ([f"images/{paths[k]}" for k in keys],
                         np.array([labels[k] for k in keys], dtype=np.int64))
        return Index(folder=folder, layout="official", classnames=[classes[c] for c in order],
                     splits=splits, image_base=folder)
