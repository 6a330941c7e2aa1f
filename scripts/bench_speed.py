#!/usr/bin/env python
"""Training and evaluation speed of every method: images/s, seconds per epoch, peak memory and the
fraction of the accelerator's peak matrix throughput reached (MFU).

    python scripts/bench_speed.py --data-root /data --dataset cub            # GPU, ViT-B/16 (default)
    python scripts/bench_speed.py --backbone ViT-L-14-quickgelu --compare     # + the unoptimised path
    python scripts/bench_speed.py --backbone embedded --device cpu --batch-size 4 --compare
    python scripts/bench_speed.py --profile --datasets synth_cub --seeds 1   # where a grid's time goes

Each method is driven through the engine's public pieces (the resolved run config of
``benchmark.config.resolve``, ``Engine.backbone/dataset``, ``protocol.load_or_create``,
``loader.build_transforms/stream_loader/eval_loader``, ``engine.make_optimizer/autocast_for/lr_at``),
never by name: a plugin's own ``training_step`` / ``predict`` run exactly as in a real run, with the
method's configuration from its YAML (``paper`` experiment for real backbones, ``embedded`` with its
shortened presets for the tiny CLIP), except for ``--batch-size``.

Per method: ``--warmup`` untimed steps, then ``--steps`` timed steps end to end (data loading
included), the same batches again with the data already on the device (compute only), one step under
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward FLOPs), and ``--eval-images`` test
images through ``predict`` (``predict_features`` on precomputed features for frozen-encoder methods
in the optimised path, as the engine's feature cache does). MFU = FLOPs per step / compute-only step
time / the GPU's peak (dense bf16 tensor-core table below, fp32 without autocast; ``--peak-tflops``
overrides); n/a on CPU. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU, the process's peak
RSS (VmHWM, reset per method where Linux allows) on CPU. Seconds per epoch = steps per epoch (as the
engine counts them: over the labeled or the unlabeled set) x the end-to-end step time.

``--compare`` runs every method twice: the optimised path (bf16 autocast on CUDA, ``--num-workers``
loader workers with pinned memory, the decoded-image cache for real datasets, cached features for
frozen-encoder evaluation) and the unoptimised one (fp32, no workers, JPEG decoding every step,
image-encoder forward at evaluation), and prints the ratios. ``--compile`` adds ``torch.compile`` of
the backbone blocks (``train.compile``) to the optimised path; run the script with and without it
to compare (the warm-up steps pay the compilation; FLOPs are counted on the eager graph).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense (no sparsity) peak matrix throughput in TFLOP/s, bf16 tensor cores / plain fp32 (vendor
# data sheets). Matched against torch.cuda.get_device_name() in order, first hit wins.
PEAK_TFLOPS = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),  # SXM / HBM3
    ("GH200", 989.0, 67.0),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A10G", 70.0, 31.2),  # A10G: 70 bf16 dense (AWS); A10: 125
    ("A10", 125.0, 31.2),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),  # fp16 tensor cores (no bf16)
]


def peak_flops(device, bf16: bool, override: Optional[float]) -> Optional[float]:
    import torch

    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, b, f in PEAK_TFLOPS:
        if key in name:
            return (b if bf16 else f) * 1e12
    return None


# -- memory ----------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    try:  # Linux: "5" resets the peak RSS (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one method, one path ---------------------------------------------------------------------------
def bench_method(engine, cfg, opt: dict, args, log) -> dict:
    """Time one method under ``cfg`` (already resolved, path options applied)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmark.engine import autocast_for, lr_at, make_batch, make_optimizer, resolve_device
    from benchmark.loader import StepBatches, build_transforms, eval_loader, stream_loader
    from benchmark.method import MethodContext, StepState
    from benchmark.protocol import load_or_create
    from benchmark.registry import METHODS
    from benchmark.ssl import fixmatch_loss

    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    autocast = autocast_for(device, cfg.train.amp)
    method_cls = METHODS.get(cfg.method)
    t0 = time.time()
    plugin = engine.dataset(cfg.dataset, cfg)
    split = load_or_create(plugin, cfg.shots, cfg.seed, engine.results_dir)
    data_setup_s = time.time() - t0
    backbone = engine.backbone_for(method_cls, cfg.backbone, device)
    backbone.short_text = cfg.train.short_text
    backbone.sdpa_blocks = cfg.train.sdpa_blocks
    ctx = MethodContext(classnames=split.id_classnames, template=plugin.template, dataset=cfg.dataset,
                        shots=cfg.shots, seed=cfg.seed)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = reset_peak_rss()
    method = method_cls(cfg.params, backbone, ctx).to(device)
    backbone.set_compiled(cfg.train.compile)  # --compile: the warm-up steps pay the compilation
    views = build_transforms(backbone.preprocess_cfg, cfg.data)
    t_setup = time.time()
    engine._setup(cfg, method, split, views, device, autocast)  # Method.setup, as a run calls it
    tc, sc = cfg.train, cfg.ssl
    out = {"method": cfg.method, "trains": bool(method.trains), "data_setup_s": round(data_setup_s, 2),
           "method_setup_s": round(time.time() - t_setup, 2)}
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    if method.trains:
        generic_ssl = sc.enabled and not method.uses_unlabeled
        want_u = method.uses_unlabeled or generic_ssl
        n_l, n_u = len(split.labeled_idx), len(split.unlabeled_idx)
        spe = StepBatches.steps_per_epoch(n_l, tc.batch_size) if tc.epoch_over == "labeled" else \
            StepBatches.steps_per_epoch(n_u, sc.unlabeled_batch_size)
        if tc.iterations:
            total_real = int(tc.iterations)
        elif tc.iterations_per_shot:
            total_real = int(tc.iterations_per_shot) * cfg.shots
        else:
            total_real = int(tc.epochs) * spe
        n_steps = args.warmup + args.steps
        workers, pin = cfg.data.num_workers, cuda
        lab = iter(stream_loader(split.train, split.labeled_idx, {v: views[v] for v in method.labeled_views},
                                 tc.batch_size, cfg.seed, "labeled", 0, n_steps, workers, pin))
        unl = None
        if want_u:
            uv = ("weak", "strong") if generic_ssl else method.unlabeled_views
            unl = iter(stream_loader(split.train, split.unlabeled_idx, {v: views[v] for v in uv},
                                     sc.unlabeled_batch_size, cfg.seed, "unlabeled", 0, n_steps, workers, pin))
        optim = make_optimizer(method.param_groups(), tc)
        method.train()

        def fetch():
            return make_batch(next(lab), next(unl) if unl is not None else None, split, device)

        def step(batch, i, backward=True):
            state = StepState(step=i, total_steps=total_real, epoch=i // spe, steps_per_epoch=spe)
            lr = lr_at(min(i + spe * tc.warmup_epochs, total_real - 1), total_real, spe, tc)  # past warm-up
            for g in optim.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            with autocast():
                loss = method.training_step(batch, state).loss
                if generic_ssl:
                    with torch.no_grad():
                        lw = method.predict(batch.u["weak"]).logits
                    ls = method.predict(batch.u["strong"]).logits
                    loss = loss + sc.weight * fixmatch_loss(lw.float(), ls.float(), sc.threshold)[0]
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()

        batches = []
        for i in range(args.warmup):
            batches.append(fetch())
            step(batches[-1], i)
        sync()
        t = time.perf_counter()
        for i in range(args.warmup, n_steps):
            batches.append(fetch())
            step(batches[-1], i)
        sync()
        e2e = (time.perf_counter() - t) / args.steps
        timed = batches[args.warmup:]
        sync()
        t = time.perf_counter()
        for i, b in enumerate(timed):
            step(b, n_steps + i)
        sync()
        compute = (time.perf_counter() - t) / args.steps
        backbone.set_compiled(False)  # count the FLOPs of the eager graph
        with FlopCounterMode(display=False) as fc:
            step(timed[0], 2 * n_steps)
        flops = float(fc.get_total_flops())
        backbone.set_compiled(cfg.train.compile)
        per_step = tc.batch_size + (sc.unlabeled_batch_size if want_u else 0)
        peak = peak_flops(device, cuda and cfg.train.amp in ("auto", "bf16"), args.peak_tflops)
        out.update({
            "batch": f"{tc.batch_size}" + (f"+{sc.unlabeled_batch_size}u" if want_u else ""),
            "images_per_step": per_step,
            "step_ms": round(e2e * 1000, 2), "compute_ms": round(compute * 1000, 2),
            "train_img_s": round(per_step / e2e, 1), "compute_img_s": round(per_step / compute, 1),
            "steps_per_epoch": spe, "s_per_epoch": round(spe * e2e, 2),
            "run_train_s_est": round(total_real * e2e, 1),
            "gflop_step": round(flops / 1e9, 3),
            "mfu": round(flops / compute / peak, 4) if peak else None,
        })
        del batches, timed, lab, unl, optim
    # evaluation throughput on the first --eval-images test images
    method.eval()
    idx = np.arange(min(args.eval_images, len(split.test)))
    loader = eval_loader(split.test, idx, views["test"], args.eval_batch_size, cfg.data.num_workers, cuda)
    use_feats = opt["feature_cache"] and method.frozen_image_encoder
    with torch.no_grad():
        if use_feats:  # as the engine's FeatureCache: features once, then predict_features
            t = time.perf_counter()
            with autocast():
                feats = torch.cat([backbone.encode_image(b["test"].to(device)).pooled.float() for b in loader])
            sync()
            out["feature_extract_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            for i in range(0, len(feats), args.eval_batch_size):
                with autocast():
                    method.predict_features(feats[i:i + args.eval_batch_size])
            sync()
        else:
            t = time.perf_counter()
            for b in loader:
                with autocast():
                    method.predict(b["test"].to(device, non_blocking=cuda))
            sync()
        dt = time.perf_counter() - t
    out["eval_img_s"] = round(len(idx) / max(dt, 1e-9), 1)
    out["eval_path"] = "cached features" if use_feats else "image forward"
    if cuda:
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["mem_kind"] = "GPU alloc"
    else:
        out["peak_mem_mb"] = round(peak_rss_mb(), 1)
        out["mem_kind"] = "RSS" if rss_reset else "RSS (process peak)"
    if cuda:
        torch.cuda.empty_cache()
    return out


# -- configuration ---------------------------------------------------------------------------------
def resolve_cfg(method: str, args, experiment: dict, optimised: bool):
    from benchmark.config import resolve
    from benchmark.registry import METHODS

    sets = list(args.set)
    if args.batch_size:
        sets += [f"train.batch_size={args.batch_size}", f"ssl.unlabeled_batch_size={args.batch_size}"]
    sets.append(f"device={args.device}")
    exp = copy.deepcopy(experiment)
    tree = exp.setdefault("config", {}) or {}
    exp["config"] = tree
    data = tree.setdefault("data", {})
    if args.data_root:
        data["root"] = args.data_root
    opts = dict((exp.get("dataset_options") or {}).get(args.dataset) or {})
    if optimised and args.image_cache and args.data_root:
        opts["image_cache"] = args.image_cache
    data["options"] = opts
    data["num_workers"] = args.num_workers if optimised else 0
    amp = "off" if not optimised else args.amp
    if amp:  # in the tree, not via --set: YAML would read a bare `off` as false
        tree.setdefault("train", {})["amp"] = amp
    if optimised and args.compile:
        tree.setdefault("train", {})["compile"] = True
    cfg = resolve(METHODS.get(method), args.dataset, args.shots, args.seed, exp, sets)
    return cfg


def pick_backbone(args) -> Dict[str, str]:
    """--backbone: embedded | auto (ViT-B-16 when its weights exist, else embedded) | MODEL."""
    from benchmark.backbone import BackboneConfig, CLIPBackbone
    from benchmark.errors import BenchmarkError
    from benchmark.experiment import load_experiment

    if args.backbone == "embedded":
        return dict(load_experiment("embedded").get("backbone") or {})
    model = "ViT-B-16-quickgelu" if args.backbone == "auto" else args.backbone
    bcfg = {"model": model, "pretrained": args.pretrained}
    try:
        CLIPBackbone.load(BackboneConfig(**bcfg), device="cpu")
    except BenchmarkError as exc:
        if args.backbone != "auto":
            raise
        print(f"note: {model}:{args.pretrained} is not available ({str(exc).split('. ')[0]}); using the "
              f"embedded tiny CLIP instead (--backbone embedded)", file=sys.stderr)
        return dict(load_experiment("embedded").get("backbone") or {})
    return bcfg


# -- output ----------------------------------------------------------------------------------------
def fmt(v, spec=".1f", na="n/a") -> str:
    return na if v is None else format(v, spec)


def table(rows: List[dict], title: str) -> str:
    hdr = (f"{'method':<14}{'batch':>8}{'img/s':>9}{'img/s*':>9}{'ms/step':>9}{'s/epoch':>9}{'GFLOP/st':>10}"
           f"{'MFU':>7}{'peak MB':>10}{'eval img/s':>11}")
    lines = [title, hdr]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['method']:<14}  FAILED: {r['error']}")
            continue
        tr = r["trains"]
        lines.append(
            f"{r['method']:<14}{r.get('batch', '-') if tr else '-':>8}"
            f"{fmt(r.get('train_img_s')) if tr else '-':>9}{fmt(r.get('compute_img_s')) if tr else '-':>9}"
            f"{fmt(r.get('step_ms')) if tr else '-':>9}{fmt(r.get('s_per_epoch'), '.2f') if tr else '-':>9}"
            f"{fmt(r.get('gflop_step'), '.2f') if tr else '-':>10}"
            f"{(fmt(r['mfu'] * 100, '.1f') + '%' if r.get('mfu') is not None else 'n/a') if tr else '-':>7}"
            f"{fmt(r['peak_mem_mb']):>10}{fmt(r['eval_img_s']):>11}")
    lines.append("img/s = training images (labeled + unlabeled) per second end to end; img/s* = compute only "
                 "(data on device); MFU on compute-only time; peak MB = " + (rows[0].get("mem_kind", "") if rows else "")
                 + "; eval img/s on cached features excludes their one-off extraction (feature_extract_s in --json)")
    return "\n".join(lines)


def ratios(opt: List[dict], base: List[dict]) -> str:
    lines = ["optimised vs unoptimised: speed-ups (s/epoch: unoptimised / optimised) and the memory ratio",
             f"{'method':<14}{'train img/s':>12}{'compute img/s':>14}{'s/epoch':>10}{'eval img/s':>11}{'peak mem':>10}"]
    b = {r["method"]: r for r in base}
    for r in opt:
        o = b.get(r["method"])
        if not o or r.get("error") or o.get("error"):
            continue

        def q(k, inverse=False):
            if not (r.get(k) and o.get(k)):
                return "-"
            return f"{(o[k] / r[k]) if inverse else (r[k] / o[k]):.2f}x"
        lines.append(f"{r['method']:<14}{q('train_img_s'):>12}{q('compute_img_s'):>14}"
                     f"{q('s_per_epoch', inverse=True):>10}{q('eval_img_s'):>11}{q('peak_mem_mb'):>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compare-step" in argv:  # each speed option on/off, step for step (scripts/bench_step.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_step import main as compare_step

        return compare_step([a for a in argv if a != "--compare-step"])
    if "--profile" in argv:  # where a grid's wall time goes, per method (scripts/bench_profile.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_profile import main as profile

        return profile([a for a in argv if a != "--profile"])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated (default: every method of the default grid)")
    p.add_argument("--backbone", default="auto",
                   help="auto (ViT-B-16 when its weights exist, else the tiny CLIP), embedded, or an open_clip model")
    p.add_argument("--pretrained", default="openai", help="tag, checkpoint file or folder for --backbone MODEL")
    p.add_argument("--dataset", default=None, help="default: cub with --data-root, else synth_cub")
    p.add_argument("--data-root", default=None)
    p.add_argument("--shots", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="labeled and unlabeled batch (default: each method's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader workers of the optimised path")
    p.add_argument("--image-cache", type=int, default=256,
                   help="decoded-image cache short side for real datasets in the optimised path (0: off)")
    p.add_argument("--amp", default=None, help="train.amp of the optimised path (default: the config's, auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone blocks in the optimised path")
    p.add_argument("--compare", action="store_true", help="also run the unoptimised path and print ratios")
    p.add_argument("--profile", action="store_true",
                   help="instead: where a grid's wall time goes per method (scripts/bench_profile.py --help)")
    p.add_argument("--compare-step", action="store_true",
                   help="instead: each speed option on/off step for step (scripts/bench_step.py --help)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU peak (TFLOP/s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--json", default=None, help="also write the measurements here")
    args = p.parse_args(argv)
    args.dataset = args.dataset or ("cub" if args.data_root else "synth_cub")

    import torch

    from benchmark.engine import Engine, resolve_device
    from benchmark.errors import BenchmarkError
    from benchmark.experiment import expand_methods, load_experiment
    from benchmark.registry import METHODS

    try:
        bcfg = pick_backbone(args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    embedded = bcfg.get("pretrained") == "embedded"
    experiment = load_experiment("embedded" if embedded else "paper")
    experiment["backbone"] = bcfg
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else \
        expand_methods(experiment.get("methods"))
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    print(f"backbone {bcfg.get('model')}:{bcfg.get('pretrained')}  dataset {args.dataset}  shots {args.shots}  "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}  "
          f"method configs from experiment {experiment['name']!r}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ossl-bench-") as tmp:
        engine = Engine(Path(tmp), log=lambda s: None)
        paths = [("optimised", True)] + ([("unoptimised", False)] if args.compare else [])
        for label, optimised in paths:
            rows = []
            for m in methods:
                try:
                    cfg = resolve_cfg(m, args, experiment, optimised)
                    print(f"[{label}] {m} ...", file=sys.stderr, flush=True)
                    rows.append(bench_method(engine, cfg, {"feature_cache": optimised}, args, print))
                except (BenchmarkError, RuntimeError, ValueError) as exc:
                    rows.append({"method": m, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
            results[label] = rows
    amp_note = "bf16 autocast" if device.type == "cuda" else "fp32 (CPU)"
    print(table(results["optimised"], f"\noptimised path: {amp_note}, {args.num_workers} loader workers"
                + (f", image cache {args.image_cache}px" if args.data_root and args.image_cache else "")
                + ", cached features for frozen-encoder evaluation"))
    if args.compare:
        print(table(results["unoptimised"], "\nunoptimised path: fp32, no loader workers, no image cache, image forward at evaluation"))
        print()
        print(ratios(results["optimised"], results["unoptimised"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "backbone": bcfg, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
