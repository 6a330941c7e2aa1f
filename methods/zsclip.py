"""Zero-shot CLIP (Radford et al. 2021): logits = CLIP logit scale x cos(image, text(template(class))).

The template is the dataset plugin's (SPEC section 3, CoOp's CUSTOM_TEMPLATES where it has one).
Known-scores: MSP (max softmax of the logits) and MCM (max softmax of the cosines, T = 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmark.method import Method, Prediction, softmax_scores
from benchmark.registry import register_method


@register_method("zsclip")
class ZeroShotCLIP(Method):
    trains = False
    frozen_image_encoder = True

    def __init__(self, cfg, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        self.register_buffer("text_weights", self.text_features(self.class_prompts()))

    def predict_features(self, features: torch.Tensor) -> Prediction:
        scale = self.backbone.logit_scale
        logits = scale * F.normalize(features.float(), dim=-1) @ self.text_weights.t()
        return Prediction(logits=logits, scores=softmax_scores(logits, scale))
