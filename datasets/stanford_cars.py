"""Stanford Cars (``stanford_cars``): 196 car models, 8,144 train / 8,041 test images.

Where it is looked for under ``--data-root``: ``stanford_cars/`` (CoOp's name), ``StanfordCars/``,
``stanford-cars/``, ``cars/``, then the root itself. Layouts:

* official archive (``car_devkit.tgz``, ``cars_train.tgz``, ``cars_test.tgz`` and the separately
  published ``cars_test_annos_withlabels.mat``): ``devkit/cars_meta.mat``,
  ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat`` (beside ``devkit/`` as CoOp
  places it, or inside it), ``cars_train/``, ``cars_test/``. Train (the unlabeled pool) = the
  official train set, 8,144 images.
* CoOp/Dassl: ``split_zhou_StanfordCars.json`` beside ``cars_train/`` and ``cars_test/``. CoOp's
  train (6,509) + val (1,635) = the official train set (8,144), used together as the pool.

Class order: ``cars_meta.mat`` = CoOp's labels. Class names as CoOp writes them (checked in
``KaiyangZhou/CoOp`` ``datasets/stanford_cars.py``, ``read_data``): the meta name with its last word
(the model year) moved to the front: "AM General Hummer SUV 2000" -> "2000 AM General Hummer SUV".
CoOp's split JSON already holds these names, so both layouts agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.errors import DatasetError
from benchmark.registry import register_dataset

from ._real import Index, Layout, RealDataset, coop_index, loadmat, mat_int, mat_str

TEST_ANNOS = ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")


def year_first(meta_name: str) -> str:
    words = meta_name.split(" ")
    return " ".join([words[-1]] + words[:-1])


@register_dataset("stanford_cars")
class StanfordCars(RealDataset):
    """Stanford Cars, 196 models (official devkit or CoOp split JSON)."""

    title = "Stanford Cars"
    description = "Stanford Cars, 196 models (98 ID + 98 OOD), 8,144 train / 8,041 test"
    template = "a photo of a {}."  # CoOp CUSTOM_TEMPLATES["StanfordCars"] [code]
    folder_names = ("stanford_cars", "StanfordCars", "stanford-cars", "cars")
    official_sizes = (196, 8144, 8041)
    layouts = (
        Layout("official", "devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
               "cars_test_annos_withlabels.mat (or devkit/cars_test_annos_withlabels.mat), cars_train/, "
               "cars_test/",
               (("devkit/cars_meta.mat",), ("devkit/cars_train_annos.mat",), TEST_ANNOS, ("cars_train/",),
                ("cars_test/",))),
        Layout("coop", "split_zhou_StanfordCars.json, cars_train/, cars_test/",
               (("split_zhou_StanfordCars.json",), ("cars_train/",), ("cars_test/",))),
    )

    def read(self, folder: Path, layout: Layout) -> Index:
        if layout.name == "coop":
            return coop_index(folder, folder / "split_zhou_StanfordCars.json", ("cars_train", "cars_test"))
        meta_path = folder / "devkit" / "cars_meta.mat"
        meta = loadmat(meta_path)
        if "class_names" not in meta:
            raise DatasetError(f"{meta_path} has no 'class_names' variable")
        names = [year_first(mat_str(x)) for x in np.asarray(meta["class_names"]).reshape(-1)]

        def read_annos(path: Path, image_dir: str):
            m = loadmat(path)
            if "annotations" not in m:
                raise DatasetError(f"{path} has no 'annotations' variable")
            ann = np.asarray(m["annotations"]).reshape(-1)
            if ann.dtype.names is None or not {"fname", "class"} <= set(ann.dtype.names):
                raise DatasetError(f"{path}: annotations need 'fname' and 'class' fields (for the test "
                                   f"set use cars_test_annos_withlabels.mat, not cars_test_annos.mat)")
            ids = [f"{image_dir}/{mat_str(a['fname'])}" for a in ann]
            labels = np.array([mat_int(a["class"]) - 1 for a in ann], dtype=np.int64)
            return ids, labels

        test_path = layout.find(folder, TEST_ANNOS)
        return Index(folder=folder, layout="official", classnames=names,
                     splits={"train": read_annos(folder / "devkit" / "cars_train_annos.mat", "cars_train"),
                             "test": read_annos(test_path, "cars_test")},
                     image_base=folder)
