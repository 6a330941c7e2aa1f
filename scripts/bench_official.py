#!/usr/bin/env python
"""Step for step against the official implementations: the suite's training step and evaluation
forward beside the official code's, on identical weights and inputs, in one process per method.

    git clone https://github.com/KaiyangZhou/CoOp                       $OFFICIAL/CoOp
    git clone https://github.com/AtsuMiyai/LoCoOp                       $OFFICIAL/LoCoOp
    git clone https://github.com/muzairkhattak/multimodal-prompt-learning $OFFICIAL/multimodal-prompt-learning
    git clone https://github.com/MaxZanella/CLIP-LoRA                   $OFFICIAL/CLIP-LoRA
    git clone https://github.com/gaopengcuhk/CLIP-Adapter               $OFFICIAL/CLIP-Adapter
    python scripts/bench_official.py --official-root $OFFICIAL                       # all five, ViT-B/16 shapes
    python scripts/bench_official.py --official-root $OFFICIAL --methods coop --steps 5 --json out.json

The official code is not shipped with the suite and is not imported by it: this benchmark reads it
from your clones. The official trainers are Dassl trainers and Dassl is not on PyPI, so the few Dassl
names their modules import (``TRAINER_REGISTRY``, ``TrainerX``, ``compute_accuracy``,
``build_optimizer``, ...) are provided here by a small stand-in (``_dassl_stub``) whose
``model_backward_and_update`` does what Dassl's does (zero_grad, backward, step). Each official model
is built with the official ``clip.build_model`` from the state dict of the suite's backbone (open_clip
``ViT-B-16-quickgelu`` with random weights: the layout and activation of OpenAI's ViT-B/16), so both
sides hold the same weights.

What is timed, per method (the ratio of medians; the sides alternate in a rotating order, step by
step, after ``--warmup`` untimed steps):

* suite ``on``: the method plugin's ``training_step`` + backward + optimiser step with the default
  speed options (``train.short_text``, ``train.sdpa_blocks``), as ``bench_step.py`` times it;
* suite ``off``: the same with every speed option off (open_clip's own blocks and ``encode_text``);
* suite ``views`` (CoOp, LoCoOp, CLIP-Adapter: frozen image side): the defaults plus ``data.cached_views``
  (off by default: it changes the augmentation stream), on a cache hit, the steady state once every
  cached view is encoded; its training losses must equal the ``on`` side's (same batch, same views);
* ``official``: CoOp's, LoCoOp's, MaPLe's and CLIP-Adapter's own ``forward_backward(batch)`` (their
  trainer classes, SGD as Dassl builds it); CLIP-LoRA has no step function (its loop is inline in
  ``lora.run_lora``), so the body of that loop for ``--encoder both`` runs here line for line
  (``clip.tokenize`` + ``encode_text`` of all class prompts, ``encode_image``, cosine logits, CE,
  AdamW, cosine scheduler step) on the official LoRA modules (``loralib.apply_lora``).
* evaluation: the suite's ``predict`` after entering eval mode (class text features computed once,
  then one batch), against the official test forward: ``model(image)`` for CoOp, LoCoOp (its
  global logits), MaPLe and CLIP-Adapter (Dassl's ``model_inference``), ``evaluate_lora``'s text pass + one ``encode_image``
  batch for CLIP-LoRA.

Before timing, both implementations' loss and evaluation logits are compared at the same learned
parameters (the suite's initial ones copied into the official modules; CLIP-LoRA's B matrices set to
random non-zero values on both sides so the low-rank path is exercised), in eval mode (no dropout).
This is also a numerical check of the suite's methods against the official code.

Where the official code cannot run unchanged here, the change is the smallest that lets it run and is
printed: (1) CLIP-Adapter's ``Adapter(1024, 4)`` is hard-coded for ResNet-50's 1024-d features; the
official ``Adapter`` class is instantiated with the backbone's width instead; (2) CLIP-Adapter's
``TextEncoder.forward`` moves the tokens ``.to('cuda')``; on a CPU the same lines run with the model's
device; (3) MaPLe's shallow projection is created in half precision (``self.proj.half()``) after the
model was cast to fp32; the whole model is cast to the run's dtype (fp32 on CPU), as every tensor must
share one dtype for a CPU matmul; (4) CLIP-LoRA's ``logit_scale`` is 100 in ``main.py`` (OpenAI CLIP's
exp(logit_scale)); here it is the backbone's exp(logit_scale), as the suite's, so the losses compare.
On CUDA (not measured yet: no GPU was available) the suite runs under bf16 autocast, CLIP-LoRA's
official step under its own fp16 autocast, and CoOp, MaPLe and CLIP-Adapter with ``PREC: fp32`` as set
here (their configs' ``fp16``, a half-precision model, is not set up by this script), so GPU ratios of
those three are not like for like.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

REPOS = {  # method -> (folder under --official-root, where its `clip` package lives, clone URL)
    "coop": ("CoOp", "CoOp", "https://github.com/KaiyangZhou/CoOp"),
    "locoop": ("LoCoOp", "LoCoOp", "https://github.com/AtsuMiyai/LoCoOp"),
    "maple": ("multimodal-prompt-learning", "multimodal-prompt-learning",
              "https://github.com/muzairkhattak/multimodal-prompt-learning"),
    "clip_lora": ("CLIP-LoRA", "CLIP-LoRA", "https://github.com/MaxZanella/CLIP-LoRA"),
    # CLIP-Adapter's repository holds only clip_adapter.py; it runs inside CoOp's code base
    "clip_adapter": ("CLIP-Adapter", "CoOp", "https://github.com/gaopengcuhk/CLIP-Adapter"),
}
CLIP_PACKAGE = {"locoop": "clip_w_local"}  # the official `clip` package's name where it is not `clip`
MODULE = {"coop": "trainers/coop.py", "locoop": "trainers/locoop.py", "maple": "trainers/maple.py", "clip_lora": "loralib/utils.py",
          "clip_adapter": "clip_adapter.py"}


def check_root(root: Path, methods) -> None:
    missing = []
    for m in methods:
        folder, clip_home, url = REPOS[m]
        for need in (root / folder / MODULE[m], root / clip_home / CLIP_PACKAGE.get(m, "clip") / "clip.py"):
            if not need.is_file():
                missing.append((need, url, folder))
    if missing:
        lines = "\n".join(f"  {p}   (git clone {u} {root / f})" for p, u, f in missing)
        raise SystemExit(f"bench_official: the official code was not found under --official-root {root}.\n"
                         f"Expected these files:\n{lines}")


# -- a stand-in for the Dassl names the official trainer modules import ---------------------------
def _dassl_stub():
    import torch

    class _Registry:
        def register(self, *a, **k):
            return (lambda cls: cls) if not a or not isinstance(a[0], type) else a[0]

    class TrainerX:  # only what forward_backward calls
        def model_backward_and_update(self, loss, names=None):  # Dassl: zero_grad, backward, step
            self.optim.zero_grad()
            loss.backward()
            self.optim.step()

        def update_lr(self, names=None):
            pass

    def compute_accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0) * 100.0 / target.size(0) for k in topk]

    def build_optimizer(model, cfg):  # Dassl's SGD branch
        params = model.parameters() if hasattr(model, "parameters") else model
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=cfg.LR, momentum=cfg.MOMENTUM,
                               weight_decay=cfg.WEIGHT_DECAY)

    mods = {n: types.ModuleType(n) for n in ("dassl", "dassl.engine", "dassl.metrics", "dassl.utils",
                                             "dassl.optim")}
    mods["dassl.engine"].TRAINER_REGISTRY = _Registry()
    mods["dassl.engine"].TrainerX = TrainerX
    mods["dassl.metrics"].compute_accuracy = compute_accuracy
    mods["dassl.utils"].load_pretrained_weights = mods["dassl.utils"].load_checkpoint = lambda *a, **k: None
    mods["dassl.optim"].build_optimizer = build_optimizer
    mods["dassl.optim"].build_lr_scheduler = lambda *a, **k: None
    sys.modules.update(mods)


def _ns(**kw):
    return types.SimpleNamespace(**kw)


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the official side of each method ----------------------------------------------------------------
class Official:
    """The official model, its step and its evaluation forward; ``load_from(suite)`` copies the
    suite's learned parameters in (for the equality check)."""

    notes: list

    def step(self, images, labels) -> float: ...

    def evaluate(self, images): ...

    def eval_loss(self, images, labels) -> float:
        import torch.nn.functional as F
        return float(F.cross_entropy(self.evaluate(images), labels))


def _dassl_trainer(cls, cfg, model, optim, device):
    tr = cls.__new__(cls)  # no Dassl __init__ (data loaders, output dirs): only the step's state
    tr.cfg, tr.model, tr.optim, tr.scaler, tr.device = cfg, model, optim, None, device
    tr.batch_idx, tr.num_batches = 0, 1 << 30
    return tr


class DasslOfficial(Official):
    """The Dassl-trainer methods: the trainer's own ``forward_backward`` and ``model(image)`` at test."""

    def _finish(self, trainer_cls, cfg, device, trainable, optimised) -> None:
        for n, q in self.model.named_parameters():  # as the trainer's build_model freezes them
            if not trainable(n):
                q.requires_grad_(False)
        self.model.to(device)
        optim = sys.modules["dassl.optim"].build_optimizer(optimised(), cfg.OPTIM)
        self.trainer = _dassl_trainer(trainer_cls, cfg, self.model, optim, device)

    def step(self, images, labels):
        self.model.train()
        return self.trainer.forward_backward({"img": images, "label": labels})["loss"]

    def evaluate(self, images):
        import torch
        self.model.eval()
        with torch.no_grad():
            return self.model(images)


class OfficialCoOp(DasslOfficial):
    def __init__(self, root, sd, classnames, device, suite_params):
        import torch
        from clip import clip  # CoOp's
        mod = _load_module(root / "CoOp/trainers/coop.py", "official_coop")
        p = suite_params
        cfg = _ns(TRAINER=_ns(COOP=_ns(N_CTX=p.n_ctx, CTX_INIT=p.ctx_init, CSC=p.csc, PREC="fp32",
                                       CLASS_TOKEN_POSITION=p.class_token_position)),
                  INPUT=_ns(SIZE=(224, 224)), OPTIM=_ns(LR=0.002, MOMENTUM=0.9, WEIGHT_DECAY=5e-4))
        clip_model = clip.build_model(sd).float()
        self.model = mod.CustomCLIP(cfg, classnames, clip_model)
        self._finish(mod.CoOp, cfg, device, lambda n: "prompt_learner" in n,
                     lambda: self.model.prompt_learner)
        self.notes = []

    def load_from(self, suite):
        self.model.prompt_learner.ctx.data.copy_(suite.prompts.ctx.data)


class OfficialLoCoOp(DasslOfficial):
    """LoCoOp's trainer: CoOp's prompt learner, a CLIP whose image tower also returns the local
    features (``clip_w_local``), and the loss CE + lambda * (-entropy of the non-top-K regions)."""

    def __init__(self, root, sd, classnames, device, suite_params, top_k):
        from clip_w_local import clip
        mod = _load_module(root / "LoCoOp/trainers/locoop.py", "official_locoop")
        p = suite_params
        cfg = _ns(TRAINER=_ns(LOCOOP=_ns(N_CTX=p.n_ctx, CTX_INIT=p.ctx_init, CSC=p.csc, PREC="fp32",
                                         CLASS_TOKEN_POSITION=p.class_token_position)),
                  INPUT=_ns(SIZE=(224, 224)), OPTIM=_ns(LR=0.002, MOMENTUM=0.9, WEIGHT_DECAY=5e-4),
                  lambda_value=p.lambda_ood, topk=top_k)
        self.model = mod.CustomCLIP(cfg, classnames, clip.build_model(sd).float())
        self._finish(mod.LoCoOp, cfg, device, lambda n: "prompt_learner" in n,
                     lambda: self.model.prompt_learner)
        self.trainer.lambda_value, self.trainer.top_k = cfg.lambda_value, cfg.topk  # as build_model sets them
        self.entropy_select_topk = mod.entropy_select_topk
        self.notes = []

    def load_from(self, suite):
        self.model.prompt_learner.ctx.data.copy_(suite.prompts.ctx.data)

    def evaluate(self, images):  # the test loop keeps output[0] of the (global, local) pair
        return super().evaluate(images)[0]

    def eval_loss(self, images, labels) -> float:  # forward_backward's loss lines, in eval mode
        import torch
        import torch.nn.functional as F
        self.model.eval()
        with torch.no_grad():
            output, output_local = self.model(images)
            loss_id = F.cross_entropy(output, labels)
            b, n = output_local.shape[0], output_local.shape[1]
            loss_en = -self.entropy_select_topk(output_local.view(b * n, -1), self.trainer.top_k, labels, n)
            return float(loss_id + self.trainer.lambda_value * loss_en)


class OfficialMaPLe(DasslOfficial):
    def __init__(self, root, sd, classnames, device, suite_params):
        from clip import clip  # MaPLe's (build_model takes design_details)
        mod = _load_module(root / "multimodal-prompt-learning/trainers/maple.py", "official_maple")
        p = suite_params
        cfg = _ns(TRAINER=_ns(MAPLE=_ns(N_CTX=p.n_ctx, CTX_INIT=p.ctx_init, PREC="fp32",
                                        PROMPT_DEPTH=p.prompt_depth)),
                  INPUT=_ns(SIZE=(224, 224)), OPTIM=_ns(LR=0.0035, MOMENTUM=0.9, WEIGHT_DECAY=5e-4))
        design = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
                  "language_ctx": 0, "maple_length": p.n_ctx}
        clip_model = clip.build_model(sd, design).float()
        self.model = mod.CustomCLIP(cfg, classnames, clip_model).float()  # note (3): proj.half()
        self._finish(mod.MaPLe, cfg, device, lambda n: "prompt_learner" in n or "VPT" in n,
                     lambda: self.model)
        self.notes = ["the official MultiModalPromptLearner.proj is created in fp16 (proj.half()); "
                      "the model is cast to fp32 as a whole"]

    def load_from(self, suite):
        pl = self.model.prompt_learner
        pl.ctx.data.copy_(suite.prompts.ctx.data)
        pl.proj.load_state_dict(suite.proj.state_dict())
        for a, b in zip(pl.compound_prompts_text, suite.deep_text):
            a.data.copy_(b.data)
        for a, b in zip(pl.compound_prompt_projections, suite.deep_proj):
            a.load_state_dict(b.state_dict())


class OfficialCLIPAdapter(DasslOfficial):
    def __init__(self, root, sd, classnames, device, suite_params):
        import torch
        from clip import clip  # CoOp's (CLIP-Adapter is built on CoOp's code base)
        mod = _load_module(root / "CLIP-Adapter/clip_adapter.py", "official_clip_adapter")
        self.notes = []
        if device.type != "cuda":  # note (2): the official forward sends the tokens to 'cuda'
            def forward(enc):
                temp = mod.CUSTOM_TEMPLATES[enc.cfg.DATASET.NAME]
                prompts = [temp.format(c.replace("_", " ")) for c in enc.classnames]
                prompts = torch.cat([clip.tokenize(p) for p in prompts]).to(enc.clip_model.positional_embedding.device)
                return enc.clip_model.encode_text(prompts)
            mod.TextEncoder.forward = forward
            self.notes.append("TextEncoder.forward runs with the model's device instead of .to('cuda')")
        cfg = _ns(DATASET=_ns(NAME="StanfordCars"),  # its template: "a photo of a {}."
                  OPTIM=_ns(LR=1e-4, MOMENTUM=0.9, WEIGHT_DECAY=5e-4))
        clip_model = clip.build_model(sd).float()
        self.model = mod.CustomCLIP(cfg, classnames, clip_model)
        dim = clip_model.text_projection.shape[1]
        if dim != 1024:  # note (1)
            self.model.adapter = mod.Adapter(dim, 4).to(clip_model.dtype)
            self.notes.append(f"Adapter(1024, 4) (ResNet-50 width, hard-coded) built as Adapter({dim}, 4)")
        self._finish(mod.CLIP_Adapter, cfg, device, lambda n: "adapter" in n, lambda: self.model.adapter)

    def load_from(self, suite):
        self.model.adapter.load_state_dict(suite.adapter.state_dict())


class OfficialCLIPLoRA(Official):
    def __init__(self, root, sd, classnames, device, suite_params, logit_scale):
        import torch
        from clip import clip  # CLIP-LoRA's
        from loralib.utils import apply_lora, get_lora_parameters, mark_only_lora_as_trainable
        p = suite_params
        self.clip = clip
        self.args = _ns(encoder=p.encoder, position=p.position, params=list(p.matrices), r=p.rank,
                        alpha=p.alpha, dropout_rate=p.dropout, backbone="ViT-B/16")
        self.model = clip.build_model(sd).float()
        self.lora_layers = apply_lora(self.args, self.model)
        self.model.to(device)
        mark_only_lora_as_trainable(self.model)
        self.optimizer = torch.optim.AdamW(get_lora_parameters(self.model), weight_decay=1e-2,
                                           betas=(0.9, 0.999), lr=2e-4)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, 500 * 16, eta_min=1e-6)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scaler = torch.cuda.amp.GradScaler(enabled=device.type == "cuda")
        self.texts = [p.template.format(c.replace("_", " ")) for c in classnames]
        self.logit_scale = float(logit_scale)
        self.device = device
        self.notes = [f"logit_scale = the backbone's exp(logit_scale) = {self.logit_scale:.4g} "
                      f"(main.py: 100, OpenAI CLIP's value)"]

    def load_from(self, suite):
        for tower_o, tower_s in ((self.model.transformer, suite.backbone.model.transformer),
                                 (self.model.visual.transformer, suite.backbone.model.visual.transformer)):
            for bo, bs in zip(tower_o.resblocks, tower_s.resblocks):
                for m in self.args.params:
                    lin = getattr(bo.attn, f"{m}_proj")
                    lin.w_lora_A.data.copy_(getattr(bs.attn, f"lora_A_{m}").data)
                    lin.w_lora_B.data.copy_(getattr(bs.attn, f"lora_B_{m}").data)

    def _logits(self, images):  # the lines of lora.run_lora's loop (and evaluate_lora) up to the logits
        import torch
        amp = lambda: torch.amp.autocast(device_type="cuda", dtype=torch.float16,  # noqa: E731
                                         enabled=self.device.type == "cuda")
        with amp():
            texts = self.clip.tokenize(self.texts).to(self.device)
            class_embeddings = self.model.encode_text(texts)
        text_features = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
        with amp():
            image_features = self.model.encode_image(images)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        return self.logit_scale * image_features @ text_features.t()

    def step(self, images, labels):  # the body of lora.run_lora's training loop, encoder 'both'
        import torch.nn.functional as F
        self.model.train()
        loss = F.cross_entropy(self._logits(images), labels)
        loss_value = loss.item()
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_value

    def evaluate(self, images):  # evaluate_lora: class text features once, then a batch (its
        import torch  # accuracy uses the cosines; scaled here to compare with the suite's logits)
        self.model.eval()
        with torch.no_grad():
            return self._logits(images).float()


# -- one method, one process ------------------------------------------------------------------------
def run_one(args) -> dict:
    import torch

    from bench_step import class_names, runtime
    from benchmark.backbone import BackboneConfig, CLIPBackbone
    from benchmark.config import resolve
    from benchmark.engine import make_optimizer
    from benchmark.experiment import load_experiment
    from benchmark.method import Batch, LabeledSet, MethodContext, StepState
    from benchmark.registry import METHODS

    name = args.one
    root = Path(args.official_root).resolve()
    folder, clip_home, _ = REPOS[name]
    sys.path.insert(0, str(root / clip_home))  # the official `clip` package of this method
    if name == "clip_lora":
        sys.path.insert(0, str(root / folder))  # loralib
    _dassl_stub()
    device, sync, autocast = runtime(args)

    torch.manual_seed(0)
    backbone = CLIPBackbone.load(BackboneConfig(model=args.backbone, pretrained=args.pretrained), device=device)
    with torch.no_grad():  # the official build_model casts the weights to fp16 (convert_weights) and
        for q in backbone.model.parameters():  # the trainers cast back to fp32; OpenAI's released
            q.copy_(q.half().float())  # weights are fp16 numbers, so round the random ones alike
    keep = {k: v.detach().clone().cpu() for k, v in backbone.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=g).to(device)
    eval_images = torch.randn(args.batch_size, 3, 224, 224, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(device)
    names = class_names(args.classes)
    cls = METHODS.get(name)
    template = "a photo of a {}."  # CLIP-Adapter's official template for the dataset named below
    ctx = MethodContext(classnames=names, template=template, dataset="cub", shots=16, seed=1)
    cfg = resolve(cls, "cub", 16, 1, load_experiment("paper"), [f"train.batch_size={args.batch_size}"])

    def batch_for(method, served=None):
        b = Batch(x={v: images for v in set(method.labeled_views) | {"weak"}}, y=labels,
                  ids=[f"img{j}" for j in range(len(labels))])
        if method.uses_unlabeled:
            b.u, b.u_ids = {v: images for v in method.unlabeled_views}, list(b.ids)
        if served:
            b.features = served
        return b

    # the suite: options on (defaults), all off, and (frozen-image methods) on + cached views; each
    # side its own copy from the same initial parameters
    suite = {}
    memo = {}  # the "views" side: the frozen image outputs of the batch, served as data.cached_views does
    sides = [("on", True), ("off", False)]
    if cls.frozen_train_outputs and not cls.modifies_backbone and \
            cls(copy.deepcopy(cfg.params), backbone, ctx).frozen_train_outputs:  # the instance decides
        sides.append(("views", True))
    for side, on in sides:
        bb = copy.deepcopy(backbone) if cls.modifies_backbone else backbone
        torch.manual_seed(1)
        method = cls(copy.deepcopy(cfg.params), bb, ctx).to(device)
        with torch.no_grad():
            method.setup(LabeledSet(ids=[f"img{j}" for j in range(len(labels))], labels=labels,
                                    features=bb.encode_image(images).pooled.float()), None)
        optim = make_optimizer(method.param_groups(), cfg.train)
        for grp in optim.param_groups:
            grp["lr"] = cfg.train.lr * grp.get("lr_scale", 1.0)
        suite[side] = (method, bb, optim, on)
        if side == "views":  # filled once here, untimed: the steady state of a cache hit
            bb.short_text = bb.sdpa_blocks = True
            with torch.no_grad():
                memo["weak"] = method.frozen_image(batch_for(method))

    def activate(side):
        method, bb, _, on = suite[side]
        bb.short_text = bb.sdpa_blocks = on

    # the official model, from the same weights
    kw = dict(root=root, sd={k: v.clone() for k, v in keep.items()}, classnames=names, device=device,
              suite_params=cfg.params)
    import contextlib
    import io
    build = {"coop": OfficialCoOp, "maple": OfficialMaPLe,
             "locoop": lambda **k: OfficialLoCoOp(**k, top_k=suite["on"][0].top_k), "clip_adapter": OfficialCLIPAdapter,
             "clip_lora": lambda **k: OfficialCLIPLoRA(**k, logit_scale=backbone.logit_scale)}[name]
    with contextlib.redirect_stdout(io.StringIO()):  # the official constructors print their modules
        official = build(**kw)
    for note in official.notes:
        print(f"  [{name}] official code adapted: {note}", flush=True)

    # the check: loss and evaluation logits of suite (options on and off) and official at the same
    # parameters, in eval mode. CLIP-LoRA: random non-zero B on both sides (B starts at zero).
    check_method = copy.deepcopy(suite["off"][0]) if not cls.modifies_backbone else None
    if cls.modifies_backbone:  # a separate copy so the timed copies keep B = 0 (their own init)
        bb_c = copy.deepcopy(backbone)  # still without LoRA (each timed side adapted its own copy)
        torch.manual_seed(1)
        check_method = cls(copy.deepcopy(cfg.params), bb_c, ctx).to(device)
        check_method.setup(LabeledSet(ids=[f"img{j}" for j in range(len(labels))], labels=labels,
                                      features=None), None)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, q in check_method.named_parameters():
                if "lora_B" in n:
                    q.copy_(torch.randn(q.shape, generator=gen) * 0.02)
    check_method.train()
    official.load_from(check_method)
    res = {}
    for side, on in (("on", True), ("off", False)):
        check_method.backbone.short_text = check_method.backbone.sdpa_blocks = on
        check_method.train()
        check_method.eval()
        with torch.no_grad(), autocast():
            loss = float(check_method.training_step(batch_for(check_method), StepState(0, 1, 0, 1)).loss)
            logits = check_method.predict(eval_images).logits.float()
        res[side] = (loss, logits)
    o_logits = official.evaluate(eval_images).float()
    o_loss = official.eval_loss(images, labels)
    scale = max(1.0, float(o_logits.abs().max()))
    agree = {}
    for side in ("on", "off"):
        dl = abs(res[side][0] - o_loss) / max(1.0, abs(o_loss))
        dlog = float((res[side][1] - o_logits).abs().max())
        agree[side] = {"rel_loss_diff": dl, "max_logit_diff": dlog, "same": dl <= 1e-3 and dlog <= 1e-2 * scale}
    print(f"  [{name}] check at equal parameters: loss official {o_loss:.5f}, suite on {res['on'][0]:.5f}, "
          f"off {res['off'][0]:.5f}; max |logit diff| on {agree['on']['max_logit_diff']:.1e}, "
          f"off {agree['off']['max_logit_diff']:.1e} (|logits| <= {scale:.1f})"
          f"{'' if agree['on']['same'] and agree['off']['same'] else '  MISMATCH'}", flush=True)
    del check_method

    # timing: the three sides alternate in a rotating order
    order = list(suite) + ["official"]
    times = {s: [] for s in order}
    etimes = {s: [] for s in order}
    losses = {s: [] for s in order}
    total = args.warmup + args.steps

    def suite_step(side, i):
        method, bb, optim, _ = suite[side]
        activate(side)
        method.train()
        state = StepState(step=i, total_steps=10 * total, epoch=0, steps_per_epoch=10 * total)
        with autocast():
            loss = method.training_step(batch_for(method, memo if side == "views" else None), state).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return float(loss.detach())

    def suite_eval(side):
        method = suite[side][0]
        activate(side)
        method.train()
        method.eval()
        with torch.no_grad(), autocast():
            return method.predict(eval_images).logits

    k = len(order)
    for i in range(total):
        for side in order[i % k:] + order[:i % k]:
            torch.manual_seed(1000 + i)
            sync()
            t = time.perf_counter()
            loss = official.step(images, labels) if side == "official" else suite_step(side, i)
            sync()
            if i >= args.warmup:
                times[side].append(time.perf_counter() - t)
            losses[side].append(loss)
    eval_order = [s for s in order if s != "views"]  # the view cache serves training steps only
    for i in range(total):
        for side in eval_order[i % len(eval_order):] + eval_order[:i % len(eval_order)]:
            sync()
            t = time.perf_counter()
            official.evaluate(eval_images) if side == "official" else suite_eval(side)
            sync()
            if i >= args.warmup:
                etimes[side].append(time.perf_counter() - t)
    med = {s: statistics.median(v) for s, v in times.items()}
    emed = {s: statistics.median(v) for s, v in etimes.items() if v}
    row = {"method": name, "step_ms": {s: round(v * 1000, 1) for s, v in med.items()},
           "eval_ms": {s: round(v * 1000, 1) for s, v in emed.items()},
           "step_on_vs_official": round(med["on"] / med["official"], 3),
           "step_off_vs_official": round(med["off"] / med["official"], 3),
           "eval_on_vs_official": round(emed["on"] / emed["official"], 3),
           "eval_off_vs_official": round(emed["off"] / emed["official"], 3),
           "step_views_vs_official": round(med["views"] / med["official"], 4) if "views" in med else None,
           "views_losses_equal_on": (max(abs(a - b) for a, b in zip(losses["views"], losses["on"])) <= 1e-4
                                     if "views" in losses else None),
           "max_train_loss_diff_on_vs_official": max(abs(a - b) for a, b in zip(losses["on"], losses["official"])),
           "check": agree, "official_loss_at_check": o_loss, "train_losses": losses,
           "official_notes": official.notes, "steps": args.steps, "warmup": args.warmup,
           "threads": torch.get_num_threads(), "device": str(device)}
    print(f"  [{name}] training losses over the {total} steps (each side its own optimiser from the same "
          f"parameters): official {' '.join(f'{x:.4f}' for x in losses['official'])}; suite "
          f"{' '.join(f'{x:.4f}' for x in losses['on'])}"
          + (" (dropout masks differ: the two implementations draw them in a different order)"
             if name == "clip_lora" else ""), flush=True)
    print(f"{name:<13} step ms on {med['on'] * 1e3:9.1f}  off {med['off'] * 1e3:9.1f}  official "
          f"{med['official'] * 1e3:9.1f}  -> on/official {row['step_on_vs_official']:.2f}x, off/official "
          f"{row['step_off_vs_official']:.2f}x | eval ms on {emed['on'] * 1e3:8.1f}  off {emed['off'] * 1e3:8.1f}"
          f"  official {emed['official'] * 1e3:8.1f} -> on/official {row['eval_on_vs_official']:.2f}x, "
          f"off/official {row['eval_off_vs_official']:.2f}x"
          + (f" | step with cached views {med['views'] * 1e3:.1f} ms -> {row['step_views_vs_official']:.3f}x"
             if "views" in med else ""), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-root", default=os.environ.get("OSSL_OFFICIAL_ROOT", ""),
                   help="folder holding the clones (default: $OSSL_OFFICIAL_ROOT)")
    p.add_argument("--methods", default="coop,locoop,maple,clip_lora,clip_adapter")
    p.add_argument("--backbone", default="ViT-B-16-quickgelu",
                   help="open_clip model of OpenAI's layout (QuickGELU), random weights unless --pretrained")
    p.add_argument("--pretrained", default="")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one method, this process
    args = p.parse_args(argv)
    if not args.official_root:
        raise SystemExit("bench_official: pass --official-root DIR (or set OSSL_OFFICIAL_ROOT): the folder "
                         "with clones of " + ", ".join(f"{f} ({u})" for f, _, u in REPOS.values()))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REPOS]
    if unknown:
        raise SystemExit(f"bench_official: no official comparison for {unknown}; known: {', '.join(REPOS)}")
    check_root(Path(args.official_root), methods)
    if args.one:
        row = run_one(args)
        print("ROW " + json.dumps(row), flush=True)
        return 0
    rows = []
    for m in methods:  # one process per method: each official repository brings its own `clip` package
        cmd = [sys.executable, __file__, "--one", m] + [a for a in (argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
            else:
                print(line, flush=True)
        if out.returncode:
            print(f"{m}: failed (exit {out.returncode})", flush=True)
    if rows:
        print("\n| method | step, suite / official | step, suite all off / official | step, suite + "
              "data.cached_views / official | eval, suite / official | eval, suite all off / official "
              "| same loss and logits |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            same = "yes" if r["check"]["on"]["same"] and r["check"]["off"]["same"] else "NO"
            views = "n/a" if r["step_views_vs_official"] is None else f"{r['step_views_vs_official']:.3f}"
            print(f"| {r['method']} | {r['step_on_vs_official']:.2f} | {r['step_off_vs_official']:.2f} | {views} | "
                  f"{r['eval_on_vs_official']:.2f} | {r['eval_off_vs_official']:.2f} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0 if len(rows) == len(methods) else 1


if __name__ == "__main__":
    sys.exit(main())
