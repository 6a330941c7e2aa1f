"""FGVC-Aircraft 2013b, variant level (``fgvc_aircraft``): 100 variants, 3,334 train / 3,333 test.

Where it is looked for under ``--data-root``: ``fgvc_aircraft/`` (CoOp's name for the archive's
``data/`` folder), ``fgvc-aircraft-2013b/data/`` (the extracted official archive),
``fgvc-aircraft-2013b/``, ``FGVC-Aircraft/``, ``aircraft/``, then the root itself.

Both layouts are the same files: ``variants.txt`` (the class order), ``images_variant_train.txt``,
``images_variant_val.txt``, ``images_variant_test.txt`` (lines ``<image id> <variant name>``) and
``images/<image id>.jpg``. CoOp trains on ``train`` and validates on ``val``; here the unlabeled pool
is ``train`` (3,334, SPEC section 3) or, with the dataset option ``trainval: true``, train + val
(6,667). Class names are the ``variants.txt`` lines as they are ("707-320", "A300B4", "Cessna 172").

Every image carries a 20-pixel copyright banner at its bottom; the dataset's README says to remove
it, CoOp's loader keeps it. Dataset option ``crop_banner`` (default ``false``, as CoOp, whose
loaders all the compared methods use): ``true`` crops the bottom 20 rows before any transform
(and before the decoded-image cache resizes the image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.errors import DatasetError
from benchmark.registry import register_dataset

from ._real import CropBottom, Index, Layout, RealDataset, read_lines

FILES = ("variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt")


@register_dataset("fgvc_aircraft")
class FGVCAircraft(RealDataset):
    """FGVC-Aircraft 2013b, 100 variants (official data/ folder; CoOp uses the same files)."""

    title = "FGVC-Aircraft 2013b"
    description = "FGVC-Aircraft 2013b variants, 100 classes (50 ID + 50 OOD), 3,334 train / 3,333 test"
    template = "a photo of a {}, a type of aircraft."  # CoOp CUSTOM_TEMPLATES["FGVCAircraft"] [code]
    folder_names = ("fgvc_aircraft", "fgvc-aircraft-2013b/data", "fgvc-aircraft-2013b", "FGVC-Aircraft",
                    "aircraft")
    official_sizes = (100, 3334, 3333)
    # trainval: False = the unlabeled pool is images_variant_train.txt (SPEC [default]); True = train+val
    # crop_banner: False [default] keeps the 20-pixel copyright banner at the bottom of every image,
    # as CoOp's loader (and so every baseline the paper compares, all built on CoOp/Dassl) reads
    # them; True removes it, as the dataset's README asks (its images carry a 20-pixel banner at the
    # bottom, to be cropped). Other pixels: part of the config hash and of the feature-cache key.
    extra_options = {"trainval": False, "crop_banner": False}
    BANNER_PX = 20  # the dataset README: every image has a 20-pixel banner at the bottom
    layouts = (
        Layout("official", "variants.txt, images_variant_{train,val,test}.txt and images/ (the data/ "
               "folder of fgvc-aircraft-2013b.tar.gz; CoOp calls this folder fgvc_aircraft/)",
               tuple((f,) for f in FILES) + (("images/",),)),
    )

    def __init__(self, root=None, **options):
        super().__init__(root, **options)
        for k in ("trainval", "crop_banner"):
            v = self.options[k]
            self.options[k] = v.strip().lower() in ("1", "true", "yes", "on") if isinstance(v, str) else bool(v)

    def pixel_op(self):
        return CropBottom(self.BANNER_PX) if self.options["crop_banner"] else None

    def expected_sizes(self):
        return (100, 6667, 3333) if self.options["trainval"] else self.official_sizes

    def allowed_layouts(self):
        return list(self.layouts)  # "coop" and "official" are the same files here

    def read(self, folder: Path, layout: Layout) -> Index:
        names = read_lines(folder / "variants.txt")
        lab = {n: i for i, n in enumerate(names)}

        def read_split(fname: str):
            ids, labels = [], []
            for ln in read_lines(folder / fname):
                img, variant = ln.split(" ", 1)
                if variant not in lab:
                    raise DatasetError(f"{folder / fname}: variant {variant!r} is not in variants.txt")
                ids.append(f"images/{img}.jpg")
                labels.append(lab[variant])
            return ids, labels

        parts = ("train", "val") if self.options["trainval"] else ("train",)
        tr_ids, tr_lab = [], []
        for p in parts:
            i, l = read_split(f"images_variant_{p}.txt")
            tr_ids += i
            tr_lab += l
        te_ids, te_lab = read_split("images_variant_test.txt")
        return Index(folder=folder, layout="official", classnames=names,
                     splits={"train": (tr_ids, np.array(tr_lab, dtype=np.int64)),
                             "test": (te_ids, np.array(te_lab, dtype=np.int64))},
                     image_base=folder)
