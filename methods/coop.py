"""CoOp (Zhou et al., IJCV 2022): M learnable context vectors shared by all classes, class token at
the end (``[SOS] v1..vM CLASS . [EOS]``); only the context trains, with cross-entropy on
logit_scale x cos(image, text). Known-scores: MSP and MCM."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.method import Method, Prediction, StepOutput, softmax_scores
from benchmark.registry import register_method

from ._text_prompts import ContextPrompts


@dataclass
class CoOpConfig:
    n_ctx: int = 16  # [code] M context tokens
    # [code] "" = random N(0, 0.02) init; the variant "a photo of a" with n_ctx = 4 inits from words
    ctx_init: str = ""


@register_method("coop")
class CoOp(Method):
    """CoOp: learnable shared text context (IJCV 2022)."""

    Config = CoOpConfig

    def __init__(self, cfg: CoOpConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        self.prompts = ContextPrompts(backbone, ctx.classnames, cfg.n_ctx, cfg.ctx_init)
        self._eval_text = None

    def train(self, mode: bool = True):
        self._eval_text = None
        return super().train(mode)

    def class_text(self) -> torch.Tensor:
        if self.training or self._eval_text is None:
            t = F.normalize(self.prompts(), dim=-1)
            if self.training:
                return t
            self._eval_text = t
        return self._eval_text

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.backbone.encode_image(images).pooled, dim=-1)
        return self.backbone.logit_scale * f @ self.class_text().t()

    def training_step(self, batch, state) -> StepOutput:
        logits = self.logits(batch.x["weak"])
        loss = F.cross_entropy(logits, batch.y)
        return StepOutput(loss=loss, logs={"acc": float((logits.argmax(-1) == batch.y).float().mean())})

    def predict(self, images: torch.Tensor) -> Prediction:
        logits = self.logits(images)
        return Prediction(logits=logits, scores=softmax_scores(logits, self.backbone.logit_scale))
