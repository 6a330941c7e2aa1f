#!/usr/bin/env python
"""How well a CLIP's patch features align with the class texts, and whether the patches a
CFSG-CLIP-style filtering module selects lie on the object: final-layer patch tokens (through
ln_post + proj) against value-path patch features (MaskCLIP / LoCoOp: the last block's value
projection, out_proj, residual and MLP without the query-key attention, then ln_post + proj).
Frozen CLIP, zero-shot class texts (the dataset's template), no training.

    python scripts/probe_patch_alignment.py                                   # tiny CLIP, 4 synthetic datasets
    python scripts/probe_patch_alignment.py --model ViT-B-16 --pretrained openai --k 20

Images: the synthetic datasets' VALIDATION split (never the test split), ID classes only (the K
known class names, as the methods see them). The renderer's object and marked-part masks
(datasets/_world.py ``dataset_masks``) give each patch's object coverage (the mask averaged over
the patch's pixels; the test transform is a plain resize of the square image).

Figures per dataset and feature kind (printed as one table, means over images):

* ``cls acc``: zero-shot accuracy of the CLS feature (the reference; the same for both kinds).
* ``patch acc``: share of (image, patch) pairs whose nearest class text is the image's class.
* ``top-k acc``: an image classified by the mean similarity of its k most similar patches per class.
* ``filter acc``: the filtering module at initialisation (CFSG-CLIP's ``semantic_filter``, guided by
  the CLS prediction, as at test time): accuracy of the filtered feature z_c, i.e. the coarse local
  head before training.
* ``obj AUROC``: per image, AUROC of sim(patch, t_y) separating object patches (coverage >= 0.5)
  from background patches (coverage < 0.5); 0.5 = no preference, below 0.5 = the background is
  closer to the class text (CLIP Surgery's "opposite visualization").
* ``obj sel`` / ``obj all``: mean object coverage of the k patches selected by sim(patch, t_y)
  (the filtering module guided by the label, as in training) / of all patches (chance).
* ``part sel`` / ``part all``: the same for the marked part (the local class cue).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = ("final", "value")


def auroc_per_image(scores, positive):
    """Mean over images of P(score of a positive > score of a negative) (+ half the ties); images
    without both classes are skipped. scores, positive: [B, P]."""
    import torch

    vals = []
    for s, pos in zip(scores, positive):
        a, b = s[pos], s[~pos]
        if len(a) and len(b):
            d = a[:, None] - b[None, :]
            vals.append(((d > 0).float() + 0.5 * (d == 0).float()).mean())
    return float(torch.stack(vals).mean()) if vals else float("nan")


def probe_dataset(bb, name: str, split: str, k: int, batch: int):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmark.config import DataConfig
    from benchmark.loader import build_transforms
    from benchmark.registry import DATASETS, METHODS

    plugin = DATASETS.get(name)()
    W = importlib.import_module("ossl_datasets._world")  # mounted by the registry (benchmark/registry.py)
    semantic_filter = METHODS.get("cfsg_clip").semantic_filter
    if not hasattr(plugin, "family"):
        raise SystemExit(f"{name} is not a synthetic dataset: the probe needs the renderer's object masks")
    data = plugin.load(split)
    K = plugin.n_known
    obj, part = W.dataset_masks(plugin.family, split, plugin.per_class[split], plugin.n_known, plugin.seed,
                                plugin.difficulty, plugin.cast, plugin.marker_scale)
    keep = np.flatnonzero(data.labels < K)
    tf = build_transforms(bb.preprocess_cfg, DataConfig())["test"]
    gh, gw = bb.grid_size
    with torch.no_grad():
        text = F.normalize(bb.encode_text(bb.tokenize([plugin.template.format(c)
                                                        for c in plugin.classnames()[:K]])), dim=-1).float()
        pooled, feats = [], {kd: [] for kd in KINDS}
        for s in range(0, len(keep), batch):
            idx = keep[s:s + batch]
            x = torch.stack([tf(data.image(int(i))) for i in idx]).to(bb.device)
            out = bb.encode_image(x, return_patches=True, return_value_local=True)
            pooled.append(out.pooled.float())
            feats["final"].append(out.patches.float())
            feats["value"].append(out.value_local.float())
        pooled = torch.cat(pooled)
        y = torch.as_tensor(data.labels[keep])

        def coverage(m):  # [N, SIZE, SIZE] -> [N, P] mean coverage per patch (row-major like the tokens)
            t = torch.as_tensor(m[keep]).unsqueeze(1)
            return F.adaptive_avg_pool2d(t, (gh, gw)).flatten(1)

        cov_obj, cov_part = coverage(obj), coverage(part)
        cls_pred = (F.normalize(pooled, dim=-1) @ text.t()).argmax(-1)
        rows = []
        for kd in KINDS:
            p = torch.cat(feats[kd])
            sim = F.normalize(p, dim=-1) @ text.t()  # [N, P, K]
            patch_acc = (sim.argmax(-1) == y[:, None]).float().mean()
            topk = sim.topk(min(k, sim.shape[1]), dim=1).values.mean(1)  # [N, K]
            z, _, _ = semantic_filter(pooled, p, text, cls_pred, min(k, p.shape[1]))
            filt = (F.normalize(z, dim=-1) @ text.t()).argmax(-1)
            s_y = sim[torch.arange(len(y)), :, y]  # [N, P] similarity to the image's own class text
            sel = s_y.topk(min(k, s_y.shape[1]), dim=1).indices
            rows.append({
                "dataset": name, "kind": kd,
                "cls acc": float((cls_pred == y).float().mean()) * 100,
                "patch acc": float(patch_acc) * 100,
                "top-k acc": float((topk.argmax(-1) == y).float().mean()) * 100,
                "filter acc": float((filt == y).float().mean()) * 100,
                "obj AUROC": auroc_per_image(s_y, cov_obj >= 0.5),
                "obj sel": float(cov_obj.gather(1, sel).mean()),
                "obj all": float(cov_obj.mean()),
                "part sel": float(cov_part.gather(1, sel).mean()),
                "part all": float(cov_part.mean()),
            })
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ossl-tiny-vit")
    ap.add_argument("--pretrained", default="embedded")
    ap.add_argument("--datasets", default="synth_dogs,synth_cars,synth_cub,synth_aircraft")
    ap.add_argument("--split", default="val", choices=("val", "train"),
                    help="images to probe (never test: the probe informs a preset)")
    ap.add_argument("--k", type=int, default=20, help="patches kept (CFSG-CLIP's top_k)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmark.backbone import BackboneConfig, CLIPBackbone
    bb = CLIPBackbone.load(BackboneConfig(model=args.model, pretrained=args.pretrained), args.device)
    bb.require_vit("the patch-alignment probe (patch tokens and the last block's value path)")
    print(f"backbone {args.model} ({args.pretrained}), grid {bb.grid_size}, k = {args.k} of "
          f"{bb.num_patches} patches, {args.split} split, ID images")
    cols = ("cls acc", "patch acc", "top-k acc", "filter acc", "obj AUROC", "obj sel", "obj all",
            "part sel", "part all")
    print("| dataset | patches | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    allrows = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        for r in probe_dataset(bb, name, args.split, args.k, args.batch):
            allrows.append(r)
            print(f"| {r['dataset']} | {r['kind']} | " + " | ".join(
                f"{r[c]:.1f}" if c.endswith("acc") else f"{r[c]:.2f}" for c in cols) + " |", flush=True)
    for kd in KINDS:
        rs = [r for r in allrows if r["kind"] == kd]
        print(f"| mean | {kd} | " + " | ".join(
            (f"{sum(r[c] for r in rs) / len(rs):.1f}" if c.endswith("acc") else
             f"{sum(r[c] for r in rs) / len(rs):.2f}") for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
