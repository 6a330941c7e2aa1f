"""A tiny random dataset for the framework's tests (loaded through OSSL_PLUGIN_PATH)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from pathlib import Path

import open_clip

from benchmark.data import DatasetPlugin, Split, pil_from_array
from benchmark.registry import register_dataset

# the tests' random micro CLIP config: registered here too, so that a process that only loads the
# plugins (a launcher's task started by submitit) knows it, not only the pytest process (conftest)
open_clip.add_model_config(str(Path(__file__).resolve().parents[2] / "assets" / "test-micro-vit.json"))


@lru_cache(maxsize=4)
def _make(num_classes: int, per_class: int, size: int, seed: int, split: str):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = np.repeat(np.arange(num_classes), per_class)
    # each class has its own mean colour so a probe can learn something
    base = np.random.default_rng(seed).integers(40, 215, size=(num_classes, 3))
    imgs = np.clip(base[labels][:, None, None, :] + rng.normal(0, 40, (len(labels), size, size, 3)), 0, 255)
    return imgs.astype(np.uint8), labels


@register_dataset("toy")
class Toy(DatasetPlugin):
    template = "a photo of a {}."
    needs_root = False
    description = "random test images (tests only)"
    option_ranges = {"num_classes": ("[2, 26]", True), "per_class": ("[1, inf)", True),
                     "size": ("[8, inf)", True), "seed": ("[0, 4294967295]", True)}

    def __init__(self, root=None, num_classes: int = 6, per_class: int = 8, size: int = 32, seed: int = 0):
        super().__init__(root)
        self.args = (int(num_classes), int(per_class), int(size), int(seed))

    def classnames(self):
        return [f"thing {chr(97 + i)}" for i in range(self.args[0])]

    def load(self, split):
        imgs, labels = _make(*self.args, split)
        return Split(ids=[f"{split}/{i:05d}" for i in range(len(labels))], labels=labels,
                     loader=lambda i: pil_from_array(imgs[i]))
