#!/usr/bin/env python
"""Which CLIP did the paper use? Zero-shot ID accuracy on the real datasets, per backbone and per
class half, beside the paper's zero-shot row (SPEC section 3, "calibration first").

    python scripts/calibrate_real.py --data-root /data [--datasets cub,stanford_cars]
        [--backbone ViT-B-16-quickgelu openai --backbone ViT-L-14-quickgelu /w/ViT-L-14.pt]

For each backbone (default: OpenAI ViT-B/16 and ViT-L/14) and dataset: the accuracy of zero-shot CLIP
(100 cos(image, text(template(class))), the dataset plugin's template, as ``zsclip``) on the test
images of the first ceil(C/2) classes among those classes (the benchmark's known set, the paper's
CLIP row), and the same for the second half as the known set. A backbone whose weights cannot be
found is skipped with the reason; a dataset that is not under --data-root likewise. Image features
go to the suite's frozen-feature cache (``<results-dir>/cache/features``), which ``zsclip`` and the
other frozen-encoder methods then reuse.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAPER_ZS = {"stanford_dogs": 79.25, "stanford_cars": 75.97, "cub": 66.00, "fgvc_aircraft": 31.37}
DEFAULT_BACKBONES = [("ViT-B-16-quickgelu", "openai"), ("ViT-L-14-quickgelu", "openai")]


def zero_shot_halves(backbone, plugin, features, test_labels) -> dict:
    """Accuracy (%) of zero-shot CLIP on each half of the classes as the known set."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    names = plugin.classnames()
    C = len(names)
    K = math.ceil(C / 2)
    out = {}
    feats = F.normalize(features.float(), dim=-1)
    for half, (lo, hi) in (("first", (0, K)), ("second", (K, C))):
        with torch.no_grad():
            t = backbone.encode_text(backbone.tokenize([plugin.template.format(c) for c in names[lo:hi]]))
            text = F.normalize(t.float(), dim=-1).cpu()
        mask = (test_labels >= lo) & (test_labels < hi)
        pred = (feats[torch.from_numpy(mask)] @ text.t()).argmax(-1).numpy() + lo
        out[half] = round(float(np.mean(pred == test_labels[mask])) * 100, 2)
        out[f"{half}_classes"] = hi - lo
    return out


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--datasets", default="stanford_dogs,stanford_cars,cub,fgvc_aircraft")
    p.add_argument("--backbone", nargs=2, action="append", metavar=("MODEL", "PRETRAINED"),
                   help="open_clip model name and tag / checkpoint (repeatable; default: OpenAI "
                        "ViT-B-16-quickgelu and ViT-L-14-quickgelu)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent.parent / "results"),
                   help="its cache/features/ receives the image features")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)

    from benchmark.backbone import BackboneConfig, CLIPBackbone
    from benchmark.config import DataConfig
    from benchmark.engine import autocast_for, resolve_device
    from benchmark.errors import BenchmarkError
    from benchmark.loader import FeatureCache, build_transforms
    from benchmark.registry import DATASETS

    device = resolve_device(args.device)
    autocast = autocast_for(device, "auto")
    cache = FeatureCache(Path(args.results_dir) / "cache" / "features")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    plugins = {}
    for name in datasets:
        try:
            plug = DATASETS.get(name)(root=args.data_root)
            plug.classnames()
            plugins[name] = plug
        except BenchmarkError as exc:
            print(f"skipping dataset {name}: {exc}\n", file=sys.stderr)
    results = {}
    for model, pretrained in args.backbone or DEFAULT_BACKBONES:
        label = f"{model}:{pretrained}"
        try:
            bb = CLIPBackbone.load(BackboneConfig(model=model, pretrained=pretrained), device=device)
        except BenchmarkError as exc:
            print(f"skipping backbone {label}: {exc}\n", file=sys.stderr)
            continue
        test_view = build_transforms(bb.preprocess_cfg, DataConfig())["test"]
        for name, plug in plugins.items():
            test = plug.load("test")
            print(f"{label} {name}: encoding {len(test)} test images ...", file=sys.stderr, flush=True)
            feats = cache.get(bb, name, test, test_view, args.batch_size, device, autocast, args.num_workers)
            results.setdefault(label, {})[name] = zero_shot_halves(bb, plug, feats, test.labels)
        del bb
    print(format_table(results, list(plugins)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def format_table(results: dict, datasets) -> str:
    if not results:
        return "no backbone could be loaded: nothing to report (see the messages above)"
    lines = ["zero-shot ID accuracy (%) with the first / second half of the classes as the known set",
             f"{'backbone':<34}" + "".join(f"{d:>22}" for d in datasets),
             f"{'paper (first half)':<34}" + "".join(f"{PAPER_ZS.get(d, float('nan')):>22.2f}" for d in datasets)]
    for label, row in results.items():
        cells = "".join(f"{row[d]['first']:>13.2f} / {row[d]['second']:>6.2f}" if d in row else f"{'-':>22}"
                        for d in datasets)
        lines.append(f"{label:<34}{cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
