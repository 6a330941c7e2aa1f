"""Text-initialised linear probe on frozen CLIP image features (a helper baseline, not in the paper
tables). The classifier starts at zero-shot CLIP's text weights and is trained with cross-entropy on
augmented labeled images; it is the suite's smallest trained method and exercises the engine in tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.method import Method, Prediction, StepOutput, softmax_scores
from benchmark.registry import register_method


@dataclass
class LinearProbeConfig:
    init: str = "text"  # text: zero-shot text weights | random: N(0, 0.02)


@register_method("linear_probe")
class LinearProbe(Method):
    Config = LinearProbeConfig
    frozen_image_encoder = True

    def __init__(self, cfg: LinearProbeConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        if cfg.init == "text":
            w = self.text_features(self.class_prompts()).clone()
        elif cfg.init == "random":
            w = torch.randn(ctx.num_classes, backbone.embed_dim) * 0.02
        else:
            raise ValueError(f"linear_probe.init must be 'text' or 'random', got {cfg.init!r}")
        self.weight = nn.Parameter(w)

    def predict_features(self, features: torch.Tensor) -> Prediction:
        scale = self.backbone.logit_scale
        logits = scale * F.normalize(features.float(), dim=-1) @ F.normalize(self.weight, dim=-1).t()
        return Prediction(logits=logits, scores=softmax_scores(logits, scale))

    def training_step(self, batch, state) -> StepOutput:
        with torch.no_grad():
            feats = self.backbone.encode_image(batch.x["weak"]).pooled
        logits = self.predict_features(feats).logits
        loss = F.cross_entropy(logits, batch.y)
        acc = (logits.argmax(-1) == batch.y).float().mean()
        return StepOutput(loss=loss, logs={"acc": float(acc)})
