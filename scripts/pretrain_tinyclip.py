#!/usr/bin/env python
"""Pretrain the suite's tiny CLIP contrastively on the embedded synthetic world.

    python scripts/pretrain_tinyclip.py            # writes assets/tinyclip/ossl-tiny-vit.pt + checkpoint.json

Images and captions come from the four families of ``datasets/_world.py`` over the attribute
combinations that are NOT benchmark classes (every attribute word is seen, no benchmark class
combination is), so zero-shot transfer to the benchmark classes is real but imperfect. Loss: CLIP's
symmetric InfoNCE with a learnable logit scale; pairs of the same combination in a batch count as
positives (soft targets), so repeated combinations are not pushed apart.

Determinism: fixed seeds, ``torch.use_deterministic_algorithms(True)``, one process. On the same
machine and library versions a rerun reproduces the checkpoint bit for bit (SHA-256); across CPUs or
torch builds floating-point kernels may differ, so ``checkpoint.json`` also records the calibration
metrics a rerun should approach.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "datasets"))

import _world as W  # noqa: E402

from benchmark.io import atomic_torch_save, atomic_write_json  # noqa: E402
from benchmark.tinyclip import CHECKPOINT, RECORD, TINY_CLIP_NAME, file_sha256, register_tiny_clip  # noqa: E402


def _family_pool(args):
    fi, fam, per_family, seed, marker_scale = args
    allowed = W.pretraining_combos(fam)
    rng = np.random.default_rng([seed, 100 + fi])
    imgs, combos = [], []
    for i in range(per_family):
        combo = allowed[i % len(allowed)]
        imgs.append(W.render(fam, combo, rng, marker_scale=marker_scale))
        combos.append(fi * len(W.ALL_COMBOS) + W.combo_index(combo))
    return imgs, combos


def build_pool(per_family: int, seed: int, marker_scale: float = W.MARKER_SCALE, workers: int = 1):
    """Images, combination codes and family names; each family has its own generator, so the pool
    is the same with any number of worker processes."""
    jobs = [(fi, fam, per_family, seed, marker_scale) for fi, fam in enumerate(W.FAMILIES)]
    if workers > 1:
        from multiprocessing import Pool
        with Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_family_pool, jobs)
    else:
        parts = [_family_pool(j) for j in jobs]
    imgs = [im for p_, _ in parts for im in p_]
    combos = [c for _, cs in parts for c in cs]
    fams = [fam for fam, (p_, _) in zip(W.FAMILIES, parts) for _ in p_]
    return np.stack(imgs), np.array(combos), fams


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-family", type=int, default=6000, help="pretraining images per family")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family-batches", type=float, default=0.0,
                   help="fraction of batches drawn from a single family (hard negatives that differ "
                        "in one attribute); the rest mix all families")
    p.add_argument("--marker-scale", type=float, default=W.MARKER_SCALE)
    p.add_argument("--device", default="cpu", help="cpu (the documented, deterministic setting) or cuda")
    p.add_argument("--workers", type=int, default=1, help="processes drawing the image pool (same pool for any value)")
    p.add_argument("--out", default=str(CHECKPOINT))
    p.add_argument("--no-calibrate", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    import open_clip

    register_tiny_clip()
    t0 = time.time()
    imgs, combos, fams = build_pool(args.per_family, args.seed, args.marker_scale, args.workers)
    fam_ids = np.array([list(W.FAMILIES).index(f) for f in fams])
    dev = torch.device(args.device)
    print(f"pool: {len(imgs)} images in {time.time() - t0:.0f}s", flush=True)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None).to(dev)
    tok = open_clip.get_tokenizer(TINY_CLIP_NAME)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), device=dev).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711), device=dev).view(1, 3, 1, 1)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "embedding" not in n]
    no_decay = [p_ for n, p_ in model.named_parameters() if not (p_.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, args.steps // 20)
    rng = np.random.default_rng([args.seed, 7])
    model.train()
    t1 = time.time()
    for step in range(args.steps):
        lr = args.lr * (step + 1) / warm if step < warm else \
            0.5 * args.lr * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr
        if args.family_batches > 0 and rng.random() < args.family_batches:
            pool_idx = np.flatnonzero(fam_ids == int(rng.integers(len(W.FAMILIES))))
            idx = rng.choice(pool_idx, args.batch_size, replace=False)
        else:
            idx = rng.choice(len(imgs), args.batch_size, replace=False)
        x = torch.from_numpy(imgs[idx]).permute(0, 3, 1, 2).float().div(255).to(dev)
        if rng.random() < 0.5:
            x = x.flip(-1)
        x = (x - mean) / std
        caps = [W.captions(fams[i], W.ALL_COMBOS[int(combos[i]) % len(W.ALL_COMBOS)], rng) for i in idx]
        t = tok(caps).to(dev)
        fi = F.normalize(model.encode_image(x), dim=-1)
        ft = F.normalize(model.encode_text(t), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * fi @ ft.t()
        same = torch.from_numpy(combos[idx][:, None] == combos[idx][None, :]).float().to(dev)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.t().log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 50 == 0 or step == 0:
            el = time.time() - t1
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} scale {scale.item():.1f} "
                  f"({el:.0f}s, {el / (step + 1):.2f}s/step)", flush=True)
    model.eval()
    # fp16 halves the committed file (the token embedding dominates); open_clip casts it back on load
    sd = {k: (v.detach().half() if v.is_floating_point() else v.detach()).clone()
          for k, v in model.state_dict().items()}
    out = Path(args.out)
    atomic_torch_save(out, sd)
    sha = file_sha256(out)
    record = {"model": TINY_CLIP_NAME, "sha256": sha, "command": "python scripts/pretrain_tinyclip.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": args.steps, "batch_size": args.batch_size, "per_family": args.per_family,
              "lr": args.lr, "seed": args.seed, "family_batches": args.family_batches,
              "marker_scale": args.marker_scale, "device": args.device, "train_seconds": round(time.time() - t1, 1),
              "torch": torch.__version__, "open_clip": open_clip.__version__}
    if out.resolve() != CHECKPOINT.resolve() and not args.no_calibrate:
        from _calibration import calibrate, format_calibration

        cal = calibrate(checkpoint=out, device=args.device,
                        dataset_options={"marker_scale": args.marker_scale})
        print(format_calibration(cal))
        record["calibration"] = cal
        atomic_write_json(out.with_suffix(".json"), record)
    if out.resolve() == CHECKPOINT.resolve():
        atomic_write_json(RECORD, record)
        if not args.no_calibrate:
            from _calibration import calibrate, format_calibration

            cal = calibrate()
            print(format_calibration(cal))
            record["calibration"] = cal
            atomic_write_json(RECORD, record)
    print(json.dumps({k: v for k, v in record.items() if k != "calibration"}, indent=1))


if __name__ == "__main__":
    main()
