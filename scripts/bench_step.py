#!/usr/bin/env python
"""Step for step: each method's training step and evaluation forward with every speed option on
and off, measured in one process with the variants alternating (``bench_speed.py --compare-step``).

    python scripts/bench_speed.py --compare-step                                  # ViT-B/16 shapes, random weights
    python scripts/bench_speed.py --compare-step --backbone embedded --classes 12 --batch-size 32
    python scripts/bench_step.py --methods coop,maple --steps 5 --json out.json   # the same, directly
    python scripts/bench_speed.py --compare-step --options short_text+sdpa_blocks --profile  # + where the time goes

What runs: the method plugins' own ``training_step`` / ``predict`` (configured from the ``paper``
experiment for a real backbone, ``embedded`` for the tiny CLIP), on one fixed batch of random images
at the backbone's input size with ``--classes`` class names of different lengths (ViT-B/16 with
random weights by default: the shapes, not the weights, set the time). For every method and every
speed option that applies to it, two copies of the method start from the same initial parameters
(same seed), each with its own optimiser, and step ``i`` runs both copies under the same RNG seed
(LoRA's dropout masks agree), in alternating order; the figure is the ratio of the median step times
(``on / off``, below 1 = faster). Before timing, both copies compute the training loss and the
evaluation logits at the shared initial parameters (eval mode: no dropout) and these are compared
(the options change no result beyond float rounding; a mismatch is printed). The training losses of
every step are kept in ``--json`` (CLIP-LoRA's dropout draws differ with the shortened text tower).
``all`` switches every applicable option at once. Options that do not apply to a method (its
image tower takes learned prompts, so no frozen feature can be reused) are marked ``n/a``.

The speed options (config keys, see the README):

* ``short_text`` (``train.short_text``, on by default): the text tower runs up to the batch's
  last EOT position instead of the full context length;
* ``sdpa_blocks`` (``train.sdpa_blocks``, on by default): open_clip's residual blocks run as one
  packed q/k/v projection and ``F.scaled_dot_product_attention`` instead of ``nn.MultiheadAttention``;
* ``view_cache`` (``data.cached_views``, off by default): frozen image-tower outputs of the training
  views are served from a cache instead of being recomputed (measured here on a cache hit, the
  steady state once every cached view has been encoded).

On CUDA both variants run under bf16 autocast (the engine's default there) with open_clip's fused
attention; on CPU in fp32. Timings on a shared CPU vary between calls; the ratios within one call are
what to compare.

``--profile`` also splits each variant's timed steps into ``text`` and ``image`` (the backbone's
tower passes, with or without gradient), ``loss`` (the rest of ``training_step``: heads, losses,
Sinkhorn...), ``backward`` and ``optim`` (optimiser step and ``zero_grad``), with the exclusive
timers of ``bench_profile.py`` (a tower pass inside ``training_step`` counts as ``text``/``image``,
not ``loss``); the ``off`` variant is the step as it ran before the options.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# class names of different lengths (the EOT position of a prompt follows its class name)
WORDS = ["red", "dark green", "long-tailed blue", "yellow-headed grey", "black and white striped",
         "small brown", "crimson-eared spotted golden", "pale"]


def class_names(k: int) -> List[str]:
    return [f"{WORDS[i % len(WORDS)]} bird {i}" for i in range(k)]


class Variant:
    """One method instance with some speed options on; ``step``/``evaluate`` time one call."""

    def __init__(self, name: str, method, backbone, optimizer, options: Dict[str, bool]):
        self.name, self.method, self.backbone, self.opt, self.options = name, method, backbone, optimizer, options
        self.times: List[float] = []
        self.eval_times: List[float] = []
        self.losses: List[float] = []
        self.memo: Dict[int, object] = {}  # view_cache: the frozen image outputs of the batch
        self.parts: Dict[str, float] = defaultdict(float)  # --profile: seconds per part, timed steps

    def activate(self) -> None:
        self.backbone.short_text = self.options.get("short_text", False)
        self.backbone.sdpa_blocks = self.options.get("sdpa_blocks", False)


def runtime(args):
    """(device, sync, autocast) from ``--device`` / ``--threads``: bf16 autocast on CUDA (the
    engine's default there), fp32 on CPU; ``sync`` waits for queued CUDA work before a clock read."""
    import torch

    from benchmark.engine import autocast_for, resolve_device
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return device, sync, autocast_for(device, "auto")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="coop,locoop,maple,clip_lora,clip_adapter,plot,cfsg_clip")
    p.add_argument("--backbone", default="ViT-B-16", help="an open_clip model (random weights unless "
                   "--pretrained) or 'embedded' (the tiny CLIP)")
    p.add_argument("--pretrained", default="", help="weights for --backbone MODEL ('' = random)")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    p.add_argument("--options", default="short_text,sdpa_blocks,view_cache,all",
                   help="comma-separated variants to compare with all options off: an option, several "
                        "joined by '+' (short_text+sdpa_blocks = the defaults), or all")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--profile", action="store_true",
                   help="also split each variant's step into text/image tower, loss, backward, optimiser")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from benchmark.backbone import BackboneConfig, CLIPBackbone
    from benchmark.experiment import load_experiment
    from benchmark.method import MethodContext

    device, sync, autocast = runtime(args)
    cuda = device.type == "cuda"
    embedded = args.backbone == "embedded"
    bcfg = BackboneConfig() if embedded else BackboneConfig(model=args.backbone, pretrained=args.pretrained)
    torch.manual_seed(0)
    backbone = CLIPBackbone.load(bcfg, device=device)
    experiment = load_experiment("embedded" if embedded else "paper")
    dataset = "synth_cub" if embedded else "cub"
    size = backbone.preprocess_cfg.get("size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    eval_images = torch.randn(args.eval_batch_size or args.batch_size, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(device)
    ctx = MethodContext(classnames=class_names(args.classes), template="a photo of a {}, a type of bird.",
                        dataset=dataset, shots=16, seed=1)
    option_names = [o.strip() for o in args.options.split(",") if o.strip()]
    print(f"backbone {bcfg.model}:{bcfg.pretrained or 'random'}  device {device}"
          f"{' (bf16 autocast)' if cuda else ' (fp32)'}  batch {args.batch_size}  classes {args.classes}  "
          f"{args.steps} timed steps per variant after {args.warmup} warm-up, variants alternating", flush=True)
    rows = []
    prof = install_profiler(sync) if args.profile else None
    try:
        bench_all(args, rows, backbone, dataset, experiment, ctx, images, eval_images, labels, option_names,
                  autocast, sync, prof)
    finally:
        for owner, attr, real in (prof.undo if prof is not None else []):  # the process's classes as they were
            setattr(owner, attr, real)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


def bench_all(args, rows, backbone, dataset, experiment, ctx, images, eval_images, labels, option_names,
              autocast, sync, prof) -> None:
    import torch

    from benchmark.config import resolve
    from benchmark.engine import make_optimizer
    from benchmark.method import Batch, StepState
    from benchmark.registry import METHODS

    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cls = METHODS.get(name)
        cfg = resolve(cls, dataset, 16, 1, experiment, [f"train.batch_size={args.batch_size}"])
        applies = {"short_text": True, "sdpa_blocks": True, "view_cache": False}
        if cls.frozen_train_outputs and not cls.modifies_backbone:  # the instance decides (config)
            applies["view_cache"] = bool(cls(copy.deepcopy(cfg.params), backbone, ctx).frozen_train_outputs)
        for opt_name in option_names:
            if opt_name == "all":
                on = {k: v for k, v in applies.items()}
                single = [k for k, v in on.items() if v]
                if len(single) == 1 and single[0] in option_names:
                    continue  # "all" equals the single option already measured
            else:  # one option, or several joined by '+' (short_text+sdpa_blocks: the defaults)
                unknown = [o for o in opt_name.split("+") if o not in applies]
                if unknown:
                    raise SystemExit(f"unknown speed option {unknown[0]!r}; known: {', '.join(applies)}, "
                                     "all, or several joined by '+'")
                on = {o: applies[o] for o in opt_name.split("+")}
            if not any(on.values()):
                rows.append({"method": name, "option": opt_name, "applies": False})
                print(f"{name:<13}{opt_name:<12} n/a", flush=True)
                continue
            rows.append(bench_pair(name, cls, cfg, backbone, ctx, images, eval_images, labels, on, args,
                                   autocast, sync, Batch, StepState, make_optimizer, torch, prof))


PARTS = ("text", "image", "loss", "backward", "optim", "other")


def install_profiler(sync):
    """bench_profile's exclusive timers around the backbone's tower passes and ``Tensor.backward``
    (class attributes); ``training_step`` and the optimiser are wrapped per variant in bench_pair."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_profile import Profiler
    from benchmark.backbone import CLIPBackbone

    prof = Profiler(sync)
    prof.undo = []
    for owner, attr, part in ((CLIPBackbone, "encode_image", "image"),
                              (CLIPBackbone, "encode_text_embeddings", "text"),
                              (torch.Tensor, "backward", "backward")):
        real = getattr(owner, attr)
        setattr(owner, attr, prof.wrap(real, part))
        prof.undo.append((owner, attr, real))
    return prof


def bench_pair(name, cls, cfg, backbone, ctx, images, eval_images, labels, on, args, autocast, sync,
               Batch, StepState, make_optimizer, torch, prof=None) -> dict:
    from benchmark.method import LabeledSet

    variants = []
    for label, opts in (("off", {}), ("on", on)):
        bb = copy.deepcopy(backbone) if cls.modifies_backbone else backbone
        bb.short_text = opts.get("short_text", False)
        bb.sdpa_blocks = opts.get("sdpa_blocks", False)
        torch.manual_seed(1)
        method = cls(copy.deepcopy(cfg.params), bb, ctx).to(images.device)
        with torch.no_grad():  # the engine's setup: labeled ids, labels, frozen test-view features
            method.setup(LabeledSet(ids=[f"img{j}" for j in range(len(labels))], labels=labels,
                                    features=bb.encode_image(images).pooled.float()), None)
        optim = make_optimizer(method.param_groups(), cfg.train)
        for g in optim.param_groups:
            g["lr"] = cfg.train.lr * g.get("lr_scale", 1.0)
        if prof is not None:  # instance attributes: this variant's calls only
            method.training_step = prof.wrap(method.training_step, "loss")
            optim.step = prof.wrap(optim.step, "optim")
            optim.zero_grad = prof.wrap(optim.zero_grad, "optim")
        variants.append(Variant(label, method, bb, optim, opts))
    total = args.warmup + args.steps

    def make_batch(v: Variant):
        m = v.method
        batch = Batch(x={view: images for view in set(m.labeled_views) | {"weak"}}, y=labels,
                      ids=[f"img{j}" for j in range(len(labels))])
        if m.uses_unlabeled:
            batch.u = {view: images for view in m.unlabeled_views}
            batch.u_ids = list(batch.ids)
        if v.options.get("view_cache"):
            if "weak" not in v.memo:  # the cache is filled once (untimed below: the warm-up step)
                v.memo["weak"] = m.frozen_image(batch)  # batch.features is still None: encodes
            batch.features = {"weak": v.memo["weak"]}
        return batch

    def run_step(v: Variant, i: int) -> None:
        v.activate()
        m = v.method
        m.train()
        batch = make_batch(v)
        state = StepState(step=i, total_steps=10 * total, epoch=0, steps_per_epoch=10 * total)
        torch.manual_seed(1000 + i)  # the same dropout masks in both variants
        if prof is not None:
            prof.run, prof.phase = defaultdict(float), "train"
        sync()
        t = time.perf_counter()
        with autocast():
            loss = m.training_step(batch, state).loss
        v.opt.zero_grad(set_to_none=True)
        loss.backward()
        v.opt.step()
        sync()
        dt = time.perf_counter() - t
        if i >= args.warmup:
            v.times.append(dt)
            if prof is not None:
                for (_, part), sec in prof.run.items():
                    v.parts[part] += sec
                v.parts["other"] += max(0.0, dt - sum(prof.run.values()))
        if prof is not None:
            prof.phase = "other"
        v.losses.append(float(loss.detach()))

    def run_eval(v: Variant):
        v.activate()
        m = v.method
        m.train()
        m.eval()  # a fresh evaluation: class text features are computed once, then the forward
        sync()
        t = time.perf_counter()
        with torch.no_grad(), autocast():
            logits = m.predict(eval_images).logits.float()
        sync()
        v.eval_times.append(time.perf_counter() - t)
        return logits

    # the check: both variants' loss and evaluation logits at the shared initial parameters, in eval
    # mode (no dropout: the shortened text tower draws fewer dropout masks in training)
    check = {}
    for v in variants:
        v.activate()
        v.method.train()
        v.method.eval()
        with torch.no_grad(), autocast():
            batch = make_batch(v)
            loss = float(v.method.training_step(batch, StepState(0, 1, 0, 1)).loss)
            check[v.name] = (loss, v.method.predict(eval_images).logits.float())
    for i in range(total):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            run_step(v, i)
    for i in range(args.warmup + args.steps):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            run_eval(v)
            if i < args.warmup:
                v.eval_times.clear()
    off, onv = variants
    med = {v.name: statistics.median(v.times) for v in variants}
    emed = {v.name: statistics.median(v.eval_times) for v in variants}
    dl = abs(check["off"][0] - check["on"][0]) / max(1.0, abs(check["off"][0]))
    dlog = float((check["off"][1] - check["on"][1]).abs().max())
    logits = {"off": check["off"][1]}
    row = {"method": name, "option": "+".join(k for k, x in on.items() if x), "applies": True,
           "step_ms_off": round(med["off"] * 1000, 1), "step_ms_on": round(med["on"] * 1000, 1),
           "step_ratio": round(med["on"] / med["off"], 3),
           "eval_ms_off": round(emed["off"] * 1000, 1), "eval_ms_on": round(emed["on"] * 1000, 1),
           "eval_ratio": round(emed["on"] / emed["off"], 3),
           "rel_loss_diff": dl, "max_logit_diff": dlog,
           "train_loss_off": off.losses, "train_loss_on": onv.losses,
           "same_loss": dl <= 1e-3, "same_logits": dlog <= 1e-2 * max(1.0, float(logits["off"].abs().max()))}
    flag = "" if row["same_loss"] and row["same_logits"] else "  MISMATCH"
    print(f"{name:<13}{row['option']:<22} step {row['step_ms_off']:9.1f} -> {row['step_ms_on']:9.1f} ms "
          f"({row['step_ratio']:.2f}x)   eval {row['eval_ms_off']:8.1f} -> {row['eval_ms_on']:8.1f} ms "
          f"({row['eval_ratio']:.2f}x)   |dloss| {dl:.1e}  max |dlogit| {dlog:.1e}{flag}", flush=True)
    if prof is not None:  # mean ms per timed step and part (the sum is the mean step, not the median)
        row["profile_ms"] = {v.name: {k: round(v.parts.get(k, 0.0) * 1000 / len(v.times), 1) for k in PARTS}
                             for v in variants}
        for v in variants:
            parts = "  ".join(f"{k} {row['profile_ms'][v.name][k]:7.1f}" for k in PARTS)
            print(f"{'':<13}{'  profile ' + v.name:<22} ms per step: {parts}", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
