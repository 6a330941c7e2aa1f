"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022; official code
KaiyangZhou/CoOp, ``trainers/coop.py``).

Prompt ``[SOS] v1..vM CLASS . [EOS]``: M learnable context vectors shared by all classes, the class
token at the end; random N(0, 0.02) init, or the word embeddings of ``ctx_init`` (then M must be
its number of words, as the official code derives it). The official options: ``csc`` (a context
per class, the paper's class-specific variant) and ``class_token_position`` end / middle / front
(``[SOS] v1..v(M/2) CLASS v(M/2+1)..vM . [EOS]``, ``[SOS] CLASS v1..vM . [EOS]``). Only the context trains, with cross-entropy
on ``logit_scale * cos(image, text)`` where the logit scale is CLIP's own (100 for OpenAI CLIP).
Known-scores: MSP (first) and MCM. Class text features are computed once per evaluation; the
image tower is untouched, so evaluation may run on the engine's cached CLIP image features
(``frozen_image_encoder``: the same numbers, computed once per dataset).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.method import Method, Prediction, StepOutput, softmax_scores
from benchmark.registry import register_method

from ._prompts import PromptLearner, PromptMethod, check_ctx_init_words


@dataclass
class CoOpConfig:
    n_ctx: int = 16  # [paper][code] M context tokens
    # [paper][code] "" = random N(0, 0.02) init; "a photo of a" (with n_ctx = 4) inits from words
    ctx_init: str = ""
    # [paper][code] CSC: one context per class (random init only, as the official code) instead of
    # one context shared by all classes
    csc: bool = False
    # [paper][code] CLASS_TOKEN_POSITION: where the class name sits among the context tokens,
    # end | middle | front
    class_token_position: str = "end"


@register_method("coop")
class CoOp(PromptMethod, Method):
    """CoOp: learnable shared text context (IJCV 2022)."""

    Config = CoOpConfig
    param_ranges = {"n_ctx": "[1, inf)"}  # declared ranges (benchmark/checks.py)
    frozen_image_encoder = True  # predictions depend on the image only through CLIP's pooled feature
    frozen_train_outputs = ("pooled",)  # training reads the frozen pooled feature (data.cached_views)

    def __init__(self, cfg: CoOpConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        self._init_cache()
        check_ctx_init_words(self.name or "coop", cfg.n_ctx, cfg.ctx_init)
        self.prompts = PromptLearner(backbone, ctx.classnames, cfg.n_ctx, cfg.ctx_init, csc=cfg.csc,
                                     class_token_position=cfg.class_token_position)

    def class_text(self) -> torch.Tensor:
        """L2-normalised class text features [K, E] (cached in eval mode)."""
        return self.cached(lambda: F.normalize(self.prompts(), dim=-1))

    def logits_from_features(self, pooled: torch.Tensor) -> torch.Tensor:
        f = F.normalize(pooled, dim=-1)
        return self.backbone.logit_scale * f @ self.class_text().t()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.backbone.encode_image(images).pooled)

    def training_step(self, batch, state) -> StepOutput:
        logits = self.logits_from_features(self.frozen_image(batch, "weak").pooled)
        loss = F.cross_entropy(logits, batch.y)
        return StepOutput(loss=loss, logs={"acc": float((logits.argmax(-1) == batch.y).float().mean())})

    def predict_features(self, features: torch.Tensor) -> Prediction:
        logits = self.logits_from_features(features.to(self.backbone.dtype))
        return Prediction(logits=logits, scores=softmax_scores(logits, self.backbone.logit_scale))
