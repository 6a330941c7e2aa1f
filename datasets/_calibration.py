"""Calibration of the embedded world against the tiny CLIP (moved out of the framework: only the
embedded world knows its dataset names). Used by ``scripts/calibrate_embedded.py``,
``scripts/pretrain_tinyclip.py`` and the tests, with ``datasets/`` on ``sys.path``
(``import _calibration``); the registry does not scan ``_`` files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

BANDS = {"zs_acc": (25.0, 75.0), "zs_auroc": (55.0, 85.0), "probe_gain": (5.0, float("inf"))}
EMBEDDED_DATASETS = ("synth_dogs", "synth_cars", "synth_cub", "synth_aircraft")


def calibration_backbone(checkpoint: Optional[Path] = None, device: str = "cpu"):
    """The tiny CLIP (committed, or ``checkpoint``) and its test transform."""
    from benchmark.backbone import CLIPBackbone
    from benchmark.config import BackboneConfig, DataConfig
    from benchmark.loader import build_transforms

    bb = CLIPBackbone.load(BackboneConfig(pretrained=str(checkpoint) if checkpoint else "embedded"), device=device)
    return bb, build_transforms(bb.preprocess_cfg, DataConfig())["test"]


def image_features(bb, transform, split, idx):
    """L2-normalised pooled image features [N, E] (CPU, fp32) of ``split`` images ``idx``."""
    import torch
    import torch.nn.functional as F

    from benchmark.loader import eval_loader

    with torch.no_grad():
        return torch.cat([F.normalize(bb.encode_image(b["test"].to(bb.device)).pooled, dim=-1).float().cpu()
                          for b in eval_loader(split, idx, transform, 256)])


def text_features(bb, template: str, names):
    """L2-normalised text features [len(names), E] (CPU, fp32) of ``template.format(name)``."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        return F.normalize(bb.encode_text(bb.tokenize([template.format(c) for c in names]).to(bb.device)),
                           dim=-1).float().cpu()


def calibrate(datasets=EMBEDDED_DATASETS, shots: int = 20, seed: int = 1, checkpoint: Optional[Path] = None,
              device: str = "cpu", dataset_options: Optional[dict] = None) -> dict:
    """Per dataset: zero-shot ID accuracy, zero-shot ID-vs-OOD AUROC (max softmax) and the accuracy
    of a ``shots``-shot logistic-regression probe on frozen image features, all in percent."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from benchmark.metrics import auroc
    from benchmark.protocol import build_manifest, num_known
    from benchmark.registry import DATASETS

    bb, tf = calibration_backbone(checkpoint, device)
    out = {}
    for name in datasets:
        plugin = DATASETS.get(name)(**(dataset_options or {}))
        names = plugin.classnames()
        K = num_known(len(names))
        train, test = plugin.load("train"), plugin.load("test")
        ft = image_features(bb, tf, test, np.arange(len(test)))
        text = text_features(bb, plugin.template, names[:K])
        logits = (float(bb.logit_scale) * ft @ text.t()).numpy()
        y = test.labels
        idm = y < K
        zs_acc = float((logits[idm].argmax(1) == y[idm]).mean()) * 100
        msp = torch.from_numpy(logits).softmax(-1).max(-1).values.numpy()
        zs_auroc = auroc(msp, np.minimum(y, K), K) * 100
        man = build_manifest(name, names, train, test, shots, seed)
        pos = {sid: i for i, sid in enumerate(train.ids)}
        lab_idx = np.array([pos[s] for s, _ in man["labeled"]])
        fl = image_features(bb, tf, train, lab_idx).numpy()
        clf = LogisticRegression(C=10.0, max_iter=2000).fit(fl, train.labels[lab_idx])
        probe = float((clf.predict(ft.numpy()[idm]) == y[idm]).mean()) * 100
        out[name] = {"zs_acc": round(zs_acc, 2), "zs_auroc": round(zs_auroc, 2),
                     "probe_acc": round(probe, 2), "probe_gain": round(probe - zs_acc, 2), "K": K}
    return out


def in_bands(row: dict) -> bool:
    return all(lo <= row[k] <= hi for k, (lo, hi) in BANDS.items())


def format_calibration(cal: dict) -> str:
    lines = [f"{'dataset':<16}{'zero-shot acc':>14}{'ZS AUROC':>10}{'20-shot probe':>15}{'gain':>7}  in bands",
             f"{'(target)':<16}{'25-75':>14}{'55-85':>10}{'':>15}{'>= 5':>7}"]
    for name, r in cal.items():
        lines.append(f"{name:<16}{r['zs_acc']:>14.2f}{r['zs_auroc']:>10.2f}{r['probe_acc']:>15.2f}"
                     f"{r['probe_gain']:>7.2f}  {'yes' if in_bands(r) else 'NO'}")
    return "\n".join(lines)
