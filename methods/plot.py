"""PLOT (Chen et al., "PLOT: Prompt Learning with Optimal Transport for Vision-Language Models",
ICLR 2023; official code CHENGY12/PLOT: ``plot-coop/trainers/plot.py`` and, for ViT,
``plot-pp/trainers/plotpp.py``).

N prompts per class (N sets of learnable context shared by all classes, class token at the end),
M local visual features. For every image b and class k, the cost between local feature m and
prompt feature n is ``1 - cos``; the entropic OT plan T (Sinkhorn, kernel ``exp(-C / eps)``,
uniform marginals 1/M and 1/N, at most ``max_iter`` rounds, stopping when the mean absolute change
of the row scaling vector is below ``tol``) is computed without gradient, and

    logit_{b,k} = logit_scale * sum_{m,n} T_{mn} cos(f_m, g_n).

Which features are "local" (``params.local_features``), i.e. which PLOT:

* ``attnpool`` -- **the official PLOT** (``plot-coop``), on a **ResNet CLIP** only (RN50 in the paper):
  the M = HW outputs of CLIP's attention pool at the grid positions (7 x 7 = 49 for RN50 at 224 px),
  each projected by the pool's ``c_proj`` like the pooled feature (``CLIPBackbone`` ``patches`` on a
  ResNet); N = 4 prompts of n_ctx = 16 random-init (N(0, 0.02)) tokens, class token at the end;
  logits = the OT logits alone, in training and prediction (the official code adds the global
  logits only on ImageNet). Official training (``plot-coop/configs/trainers/PLOT/rn50.yaml`` and
  ``train.py``): SGD lr 0.002, cosine, one constant warm-up epoch at 1e-5, batch 128 (32 on Cars,
  Aircraft, Flowers), 200 epochs for 5 or more shots (50 for 1 shot, 100 for 2 and 4); the preset
  ``configs/experiments/plot_rn50.yaml`` sets them, since ``configs/methods/plot.yaml``'s ``train``
  is PLOT++'s.
* ``plotpp`` (default) -- the official ViT recipe, **PLOT++**: M sets of ``n_ctx_vision`` visual prompt tokens
  (N(0, 0.02)) appended after the patch tokens; each set gives one prompt-conditioned CLS feature,
  and those M features are the local features. The N text prompts start from the per-dataset
  template list ``ctx_init_list`` (their n_ctx = the word count of the first template, as the
  official code). Two stages: the first ``stage1_fraction`` of the steps trains only the visual
  prompts with logits = global + OT (the official "vision" stage, TRADE_OFF True; global =
  cos(mean of the M image features, mean of the N text features)); the rest trains both prompt sets
  with OT logits only (the "joint" stage, TRADE_OFF False), which is also what predicts. Deviation:
  the official code runs the stages as two runs, each with its own warm-up + cosine schedule and a
  fresh optimizer; here one run carries one schedule across both stages.
* ``patches`` -- **our own cheap ViT variant**: the M projected patch tokens (``ln_post`` + ``proj``
  of the last layer's patch outputs); N prompts of ``n_ctx`` random-init tokens (PLOT's recipe).
  The official PLOT code supports only ResNet (``attnpool``); on a ResNet CLIP ``patches`` gives
  the same attention-pool grid as ``attnpool``.
* ``value`` -- as ``patches`` with LoCoOp's value-path local features (MaskCLIP-style).
  Both cheap variants need patch tokens aligned with text, which CLIP's are not (see
  configs/methods/plot.yaml for the embedded-world figures); PLOT++ avoids this.

Known-scores: MSP and MCM of the (OT) logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.errors import ConfigError
from benchmark.method import Method, Prediction, StepOutput, softmax_scores
from benchmark.registry import register_method

from ._prompts import PromptLearner, PromptMethod, check_ctx_init_words, sinkhorn


@dataclass
class PLOTConfig:
    # [code] plotpp (official ViT recipe, PLOT++) | attnpool (official PLOT, ResNet CLIP) |
    # patches | value (ours)
    local_features: str = "plotpp"
    n_prompts: int = 4  # [paper][code] N text prompts per class
    n_ctx: int = 16  # [paper][code] context tokens per prompt (plotpp: words of ctx_init_list[0])
    ctx_init: str = ""  # [code] "" = random N(0, 0.02) (patches variant)
    eps: float = 0.1  # [paper][code] Sinkhorn entropic regularisation
    max_iter: int = 100  # [code] Sinkhorn iteration cap
    tol: float = 0.01  # [code] stop when mean |r - r_prev| < tol
    # -- PLOT++ (local_features: plotpp) --
    n_visual_prompts: int = 4  # [code] M sets of visual prompts
    n_ctx_vision: int = 2  # [code] N_CTX_V tokens per set
    # [code] PLOT++ template lists (StanfordCars / Caltech101 list; per-dataset lists in the YAML)
    ctx_init_list: List[str] = field(default_factory=lambda: [
        "a photo of a", "this is a photo", "this is picture of", "one picture of a"])
    stage1_fraction: float = 0.5  # [code] two stages of 50 epochs each -> half of the steps


@register_method("plot")
class PLOT(PromptMethod, Method):
    """PLOT: N prompts per class matched to local visual features by optimal transport (ICLR 2023)."""

    Config = PLOTConfig
    # declared ranges of the numeric parameters (benchmark/checks.py)
    param_ranges = {"n_prompts": "[1, inf)", "n_ctx": "[1, inf)", "eps": "(0, inf)",
                    "max_iter": "[1, inf)", "tol": "[0, inf)", "n_visual_prompts": "[1, inf)",
                    "n_ctx_vision": "[1, inf)", "stage1_fraction": "[0, 1]"}

    def __init__(self, cfg: PLOTConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        self._init_cache()
        self.plotpp = cfg.local_features == "plotpp"
        if cfg.local_features not in ("patches", "value", "plotpp", "attnpool"):
            raise ConfigError(f"plot.params.local_features must be plotpp, attnpool, patches or value, "
                              f"got {cfg.local_features!r}")
        if self.plotpp:
            backbone.require_vit("PLOT++ (plot.params.local_features=plotpp: visual prompt tokens in the "
                                 "image transformer; on a ResNet CLIP use local_features=attnpool, the "
                                 "official PLOT)")
        if cfg.local_features == "attnpool" and backbone.image_tower != "resnet":
            raise ConfigError(
                "plot.params.local_features=attnpool is the official PLOT, whose local features are the "
                "attention-pool grid of a ResNet CLIP; this backbone is a ViT (no attention pool). Use "
                "a ResNet CLIP (backbone.model=RN50-quickgelu backbone.pretrained=openai) or, on a ViT, "
                "local_features=plotpp (the official ViT recipe, PLOT++)")
        if cfg.eps <= 0 or cfg.max_iter < 1:
            raise ConfigError("plot.params.eps must be > 0 and max_iter >= 1")
        if self.plotpp:
            inits = list(cfg.ctx_init_list)
            if len(inits) != cfg.n_prompts:
                raise ConfigError(f"plot.params.ctx_init_list has {len(inits)} templates for "
                                  f"n_prompts={cfg.n_prompts}")
            n_ctx = len(inits[0].split())  # [code] n_ctx = words of the first template
            self.prompts = PromptLearner(backbone, ctx.classnames, n_ctx, inits, cfg.n_prompts)
            v = torch.empty(cfg.n_visual_prompts, cfg.n_ctx_vision, backbone.vision_width,
                            dtype=backbone.dtype, device=backbone.device)
            nn.init.normal_(v, std=0.02)
            self.ctx_vision = nn.Parameter(v)
        else:
            check_ctx_init_words("plot", cfg.n_ctx, cfg.ctx_init)
            self.prompts = PromptLearner(backbone, ctx.classnames, cfg.n_ctx, cfg.ctx_init, cfg.n_prompts)
        self._stage = 2  # plotpp: 1 while training the visual prompts alone

    # -- features -----------------------------------------------------------------------------
    def prompt_features(self):
        """Unnormalised text features ``[N, K, E]`` (cached in eval mode)."""
        def compute():
            ctx = self.prompts.context()
            if self.plotpp and self._stage == 1:
                ctx = ctx.detach()  # stage 1: the text prompts stay at their template init
            t = self.prompts(ctx=ctx)
            return t.reshape(self.cfg.n_prompts, self.ctx.num_classes, -1)
        return self.cached(compute)

    def local_features(self, images: torch.Tensor):
        """(local features ``[B, M, E]``, their pool ``[B, E]``), unnormalised."""
        if self.plotpp:
            M, B = self.cfg.n_visual_prompts, images.shape[0]
            x = images.repeat(M, 1, 1, 1)  # row m * B + b: image b with visual prompt set m
            p = self.ctx_vision.repeat_interleave(B, dim=0)
            f = self.backbone.encode_image(x, prompts=p).pooled.reshape(M, B, -1).transpose(0, 1)
            return f, f.mean(1)
        if self.cfg.local_features == "value":
            out = self.backbone.encode_image(images, return_value_local=True)
            return out.value_local, out.pooled
        # patches (ViT: projected patch tokens) and attnpool (ResNet: the attention-pool grid)
        out = self.backbone.encode_image(images, return_patches=True)
        return out.patches, out.pooled

    def transport_plan(self, loc: torch.Tensor, text: torch.Tensor):
        """(plan ``[B * K, M, N]``, cosine similarities ``[B * K, M, N]``) between local features
        ``[B, M, E]`` and prompt features ``[N, K, E]``; row ``b * K + k`` is image b, class k."""
        cfg = self.cfg
        loc_n, text_n = F.normalize(loc, dim=-1), F.normalize(text, dim=-1)
        sim = torch.einsum("bmd,nkd->bkmn", loc_n, text_n)  # [B, K, M, N]
        B, K, M, N = sim.shape
        sim = sim.reshape(B * K, M, N)
        with torch.no_grad():
            kern = torch.exp(-(1.0 - sim.float()) / cfg.eps)
            u = kern.new_full((B * K, M), 1.0 / M)
            v = kern.new_full((B * K, N), 1.0 / N)
            plan = sinkhorn(kern, u, v, cfg.max_iter, cfg.tol)
        if torch.isnan(plan).any():
            raise FloatingPointError("PLOT: the Sinkhorn plan has NaNs (eps too small for the costs?)")
        return plan, sim

    def ot_logits(self, images: torch.Tensor, with_global: bool = False) -> torch.Tensor:
        loc, pool = self.local_features(images)
        text = self.prompt_features()  # [N, K, E]
        plan, sim = self.transport_plan(loc, text)
        B, K = loc.shape[0], text.shape[1]
        scale = self.backbone.logit_scale
        logits = scale * (plan.to(sim.dtype) * sim).sum((1, 2)).reshape(B, K)
        if with_global:
            g = F.normalize(pool, dim=-1) @ F.normalize(text.mean(0), dim=-1).t()
            logits = logits + scale * g
        return logits

    # -- training / prediction ----------------------------------------------------------------
    def training_step(self, batch, state) -> StepOutput:
        stage = 2
        if self.plotpp and state is not None and state.step < round(self.cfg.stage1_fraction * state.total_steps):
            stage = 1
        if stage != self._stage:
            self._stage = stage
            self._eval_cache.clear()
        logits = self.ot_logits(batch.x["weak"], with_global=(stage == 1))
        loss = F.cross_entropy(logits, batch.y)
        return StepOutput(loss=loss, logs={"acc": float((logits.argmax(-1) == batch.y).float().mean()),
                                           "stage": float(stage)})

    def train(self, mode: bool = True):
        if not mode:
            self._stage = 2  # evaluation always uses the joint (final) model
        return super().train(mode)

    def predict(self, images: torch.Tensor) -> Prediction:
        logits = self.ot_logits(images)
        return Prediction(logits=logits, scores=softmax_scores(logits, self.backbone.logit_scale))
