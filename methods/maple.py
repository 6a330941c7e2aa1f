"""MaPLe (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023; official code
muzairkhattak/multimodal-prompt-learning, ``trainers/maple.py`` and ``clip/model.py``).

* Text: ``n_ctx`` = 2 learnable context tokens initialised from the first 2 tokens of
  "a photo of a" (the official code cuts the init string's embedding to ``n_ctx``; the rest of the
  string, "of a", stays as fixed words: every prompt reads "a photo of a CLASS.").
* Deep prompts up to depth J = 9 in both towers: ``J - 1`` learnable text prompts ``[n_ctx, W_t]``
  (N(0, 0.02)) replace the previous layer's outputs at the context positions at the input of text
  blocks 1..J-1 (0-based; the shallow context feeds block 0). After block J-1 the prompt tokens
  propagate unchanged.
* Vision: the visual prompts are coupling functions of the text prompts: a linear map
  ``W_t -> W_v`` of the shallow context (appended after the patch tokens before ``ln_pre``) and
  one linear map per deeper layer, replacing the visual prompt tokens at the input of vision blocks
  1..J-1. The per-depth maps start as copies of one ``nn.Linear`` (the official ``_get_clones``
  deep-copies a single layer), the shallow map is a separate ``nn.Linear`` (PyTorch default init).
* Only the prompts and coupling layers train; cross-entropy on CLIP's logit scale x cos.
  Known-scores: MSP, MCM.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.errors import ConfigError
from benchmark.method import Method, Prediction, StepOutput, softmax_scores
from benchmark.registry import register_method

from ._prompts import PromptLearner, PromptMethod


@dataclass
class MaPLeConfig:
    n_ctx: int = 2  # [paper][code] N_CTX
    ctx_init: str = "a photo of a"  # [paper][code] CTX_INIT (cut to its first n_ctx tokens)
    prompt_depth: int = 9  # [paper][code] PROMPT_DEPTH J (1 = shallow MaPLe)


@register_method("maple")
class MaPLe(PromptMethod, Method):
    """MaPLe: deep coupled vision-language prompts (CVPR 2023)."""

    Config = MaPLeConfig
    param_ranges = {"n_ctx": "[1, inf)", "prompt_depth": "[1, inf)"}  # declared ranges (benchmark/checks.py)

    def __init__(self, cfg: MaPLeConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        backbone.require_vit("MaPLe's deep visual prompts (prompt tokens in the image transformer's "
                             "blocks; the official MaPLe is ViT-only)")
        self._init_cache()
        depth = cfg.prompt_depth
        if depth < 1 or depth > min(backbone.text_layers, backbone.vision_layers):
            raise ConfigError(f"maple.params.prompt_depth={depth} must be in 1..{min(backbone.text_layers, backbone.vision_layers)}")
        if cfg.ctx_init and cfg.n_ctx > 4:  # [code] the official code inits from words only if n_ctx <= 4
            raise ConfigError("maple.params.ctx_init is used only with n_ctx <= 4 (official); set ctx_init: ''")
        wt, wv = backbone.text_width, backbone.vision_width
        # creation order follows the official learner: context, shallow coupling, deep text
        # prompts, deep couplings
        self.prompts = PromptLearner(backbone, ctx.classnames, cfg.n_ctx, cfg.ctx_init)
        self.proj = nn.Linear(wt, wv)  # shallow coupling: text context -> first visual prompts
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.empty(cfg.n_ctx, wt)) for _ in range(depth - 1)])
        for p in self.deep_text:
            nn.init.normal_(p, std=0.02)
        single = nn.Linear(wt, wv)
        self.deep_proj = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])
        self.to(device=backbone.device, dtype=backbone.dtype)

    # -- prompts ------------------------------------------------------------------------------
    def text_deep_prompts(self) -> Optional[List[Optional[torch.Tensor]]]:
        return [None, *self.deep_text] if len(self.deep_text) else None

    def visual_prompts(self):
        """(shallow visual prompts ``[n_ctx, W_v]``, deep list ``[None, p1, ..., p_{J-1}]``)"""
        shallow = self.proj(self.prompts.ctx)
        deep = [None, *[f(p) for f, p in zip(self.deep_proj, self.deep_text)]] if len(self.deep_text) else None
        return shallow, deep

    def _class_text(self) -> torch.Tensor:
        return F.normalize(self.prompts(deep_prompts=self.text_deep_prompts()), dim=-1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        text, (shallow, deep) = self.cached(lambda: (self._class_text(), self.visual_prompts()))
        f = F.normalize(self.backbone.encode_image(images, prompts=shallow, deep_prompts=deep).pooled, dim=-1)
        return self.backbone.logit_scale * f @ text.t()

    def training_step(self, batch, state) -> StepOutput:
        logits = self.logits(batch.x["weak"])
        loss = F.cross_entropy(logits, batch.y)
        return StepOutput(loss=loss, logs={"acc": float((logits.argmax(-1) == batch.y).float().mean())})

    def predict(self, images: torch.Tensor) -> Prediction:
        logits = self.logits(images)
        return Prediction(logits=logits, scores=softmax_scores(logits, self.backbone.logit_scale))
