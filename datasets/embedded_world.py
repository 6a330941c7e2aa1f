"""The four embedded synthetic fine-grained datasets (roles of Stanford Dogs, Stanford Cars,
CUB-200-2011 and FGVC-Aircraft). Generated in memory, deterministically; see ``_world.py``."""
from __future__ import annotations

from typing import List

import numpy as np

from benchmark.data import DatasetPlugin, Split, pil_from_array
from benchmark.registry import register_dataset

from . import _world as W


class _Synthetic(DatasetPlugin):
    family: str = ""
    needs_root = False
    option_ranges = {"n_known": ("[1, 24]", True),  # 2 x n_known classes out of 64 attribute combinations
                     "train_per_class": ("[1, inf)", True), "test_per_class": ("[1, inf)", True),
                     "val_per_class": ("[1, inf)", True),
                     "seed": ("[0, 4294967295]", True), "difficulty": "[0, inf)", "cast": "(0, inf)",
                     "marker_scale": "(0, 1]"}
    splits = ("train", "test", "val")

    def __init__(self, root=None, n_known: int = 12, train_per_class: int = 30,
                 test_per_class: int = 15, val_per_class: int = 15, seed: int = 0, difficulty: float = 3.0,
                 cast=(1.2, 0.95, 0.75), marker_scale: float = W.MARKER_SCALE):
        # difficulty (noise and colour jitter) and cast (a per-channel gain: the benchmark "camera")
        # make the benchmark images a domain shift from the pretraining images, as real
        # fine-grained datasets are from web captions; chosen so that the calibration report lands
        # zero-shot accuracy and the probe gain inside their target bands [default]
        super().__init__(root)
        self.n_known, self.seed = int(n_known), int(seed)
        self.difficulty, self.cast = float(difficulty), tuple(float(c) for c in cast)
        self.marker_scale = float(marker_scale)
        # "val": a validation split for tuning presets (eval.split=val), disjoint from train and test
        # and drawn from the test split's distribution, of all 24 classes like the test split [default]
        self.per_class = {"train": int(train_per_class), "test": int(test_per_class),
                          "val": int(val_per_class)}

    def classnames(self) -> List[str]:
        fam = W.FAMILIES[self.family]
        return [W.class_name(fam, c) for c in W.benchmark_classes(self.family, self.n_known, self.seed)]

    def labels(self, split: str):
        if split not in self.per_class:
            raise ValueError(f"split must be one of {', '.join(self.splits)}, got {split!r}")
        # dataset_arrays' class-major order, without rendering the images (for --dry-run)
        return np.repeat(np.arange(2 * self.n_known), self.per_class[split])

    def load(self, split: str) -> Split:
        if split not in self.per_class:
            raise ValueError(f"split must be one of {', '.join(self.splits)}, got {split!r}")
        imgs, labels = W.dataset_arrays(self.family, split, self.per_class[split], self.n_known, self.seed,
                                        self.difficulty, self.cast, self.marker_scale)
        return Split(ids=[f"{split}/{i:05d}" for i in range(len(labels))], labels=labels,
                     loader=lambda i: pil_from_array(imgs[i]))


def _make(name: str, family: str, role: str):
    cls = type(name, (_Synthetic,), {
        "family": family, "template": W.FAMILIES[family].template,
        "description": f"synthetic {W.FAMILIES[family].noun}s (role of {role}), 24 classes, 720 train / 360 test",
        "__doc__": f"Synthetic fine-grained {family} (the embedded world's {role})."})
    return register_dataset(name)(cls)


SynthDogs = _make("synth_dogs", "dogs", "Stanford Dogs")
SynthCars = _make("synth_cars", "cars", "Stanford Cars")
SynthCUB = _make("synth_cub", "birds", "CUB-200-2011")
SynthAircraft = _make("synth_aircraft", "aircraft", "FGVC-Aircraft")
