#!/usr/bin/env python
"""Calibration report of the embedded world: per synthetic dataset, zero-shot ID accuracy,
zero-shot ID-vs-OOD AUROC (max softmax) and a 20-shot linear probe on frozen image features.

    python scripts/calibrate_embedded.py                 # the report (exit 1 if a band is missed)
    python scripts/calibrate_embedded.py --attributes    # also: how well each attribute is read
    python scripts/calibrate_embedded.py --checkpoint other.pt --set difficulty=2.2

Targets: zero-shot accuracy 25-75 %, probe at least 5 points above zero-shot, AUROC 55-85.
``--attributes`` prints, per dataset, the zero-shot accuracy of each attribute (body colour, part
colour, pattern) on all test images when the other two are given: the image is scored against the
four class phrases that differ from its own in that attribute only (chance 25 %). An attribute the
tiny CLIP cannot read makes the unknowns that differ in it exact look-alikes.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "datasets"))

from _calibration import EMBEDDED_DATASETS, calibrate, format_calibration, in_bands  # noqa: E402


def attribute_probe(checkpoint=None, dataset_options=None, datasets=EMBEDDED_DATASETS) -> dict:
    import numpy as np

    import _world as W
    from benchmark.registry import DATASETS
    from _calibration import calibration_backbone, image_features, text_features

    bb, tf = calibration_backbone(checkpoint)
    out = {}
    for name in datasets:
        plugin = DATASETS.get(name)(**(dataset_options or {}))
        fam = W.FAMILIES[plugin.family]
        test = plugin.load("test")
        truth = np.array(W.benchmark_classes(plugin.family, plugin.n_known, plugin.seed))[test.labels]
        img = image_features(bb, tf, test, np.arange(len(test)))
        txt = text_features(bb, plugin.template, [W.class_name(fam, c) for c in W.ALL_COMBOS])
        sim = (img @ txt.t()).numpy()
        row = {}
        for a, attr in enumerate(("colour", "marker", "pattern")):
            # the four phrases that differ from the image's own class in attribute a only
            cand = np.array([[W.combo_index(tuple(k if j == a else v for j, v in enumerate(t))) for k in range(4)]
                             for t in truth])
            pred = np.take_along_axis(sim, cand, 1).argmax(1)
            row[attr] = round(float((pred == truth[:, a]).mean()) * 100, 2)
        out[name] = row
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a tiny-CLIP checkpoint file (default: the committed one)")
    p.add_argument("--attributes", action="store_true", help="also print the per-attribute zero-shot probe")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="OPTION=VALUE",
                   help="a synthetic-dataset option (difficulty=3.0, marker_scale=0.3, ...)")
    args = p.parse_args()
    import yaml

    opts = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    cal = calibrate(checkpoint=ckpt, dataset_options=opts or None)
    print(format_calibration(cal))
    if args.attributes:
        print(f"\n{'attribute read, others given':<30}{'body colour':>12}{'part colour':>12}{'pattern':>9}  (chance 25)")
        for name, r in attribute_probe(ckpt, opts or None).items():
            print(f"{name:<30}{r['colour']:>12.2f}{r['marker']:>12.2f}{r['pattern']:>9.2f}")
    return 0 if all(in_bands(r) for r in cal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
