"""CLIP-Adapter (Gao et al., IJCV 2023 / arXiv 2110.04544), the visual-adapter variant of the official
``clip_adapter.py`` (gaopengcuhk/CLIP-Adapter):

    A(f) = ReLU(W2 ReLU(W1 f)),  W1: d -> d/4, W2: d/4 -> d, no bias (nn.Linear's default init)
    f*   = alpha A(f) + (1 - alpha) f,  alpha = 0.2
    logits = CLIP logit scale x cos(f*, t_c),  t_c = text(template(class))

``f`` is CLIP's unnormalised image feature (the adapter acts before the L2 normalisation, as in the
official forward); the text classifier is the dataset's hand-crafted template through the frozen text
tower; only the adapter trains (cross-entropy). The image encoder is frozen, so evaluation runs on the
engine's cached test features (``predict_features``).

Training features: ``train_features: augmented`` (the default, faithful to the Dassl recipe) encodes
the augmented labeled views at every step. ``train_features: cached`` is our cheaper option: it
trains on the eval-transform view (no augmentation), whose frozen features the engine serves to
``setup`` (computed once per backbone and dataset and shared by every method and seed); a step looks
its images' features up by ``batch.ids`` and loads no images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.method import Method, Prediction, StepOutput, softmax_scores
from benchmark.registry import register_method


@dataclass
class CLIPAdapterConfig:
    reduction: int = 4  # [paper][code] bottleneck width d / reduction
    ratio: float = 0.2  # [paper][code] alpha, the residual blend of adapted and original features
    # [default] augmented: encode the augmented labeled views every step (Dassl recipe) |
    # cached: eval-transform views encoded once and memoised (no augmentation; faster)
    train_features: str = "augmented"


class Adapter(nn.Module):
    """Two bias-free linear layers with ReLU after each (the official ``Adapter``)."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"clip_adapter.params.reduction={reduction} leaves no bottleneck for d={dim}")
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register_method("clip_adapter")
class CLIPAdapter(Method):
    """CLIP-Adapter: residual bottleneck adapter on the CLIP image feature (IJCV 2023)."""

    Config = CLIPAdapterConfig
    param_ranges = {"reduction": "[1, inf)", "ratio": "[0, 1]"}  # declared ranges (benchmark/checks.py)
    frozen_image_encoder = True
    frozen_train_outputs = ("pooled",)  # augmented mode: the frozen feature of the weak view

    def __init__(self, cfg: CLIPAdapterConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        if cfg.train_features not in ("augmented", "cached"):
            raise ValueError(f"clip_adapter.params.train_features must be augmented or cached, "
                             f"got {cfg.train_features!r}")
        if not 0.0 <= cfg.ratio <= 1.0:
            raise ValueError(f"clip_adapter.params.ratio must be in [0, 1], got {cfg.ratio}")
        self.adapter = Adapter(backbone.embed_dim, cfg.reduction)
        self.register_buffer("text_weights", self.text_features(self.class_prompts()))
        if cfg.train_features == "cached":  # the engine reads the instance's attributes
            self.setup_features = True
            self.labeled_views = ()
            self.frozen_train_outputs = ()  # no weak view: data.cached_views does not apply
        self._cached: Dict[str, torch.Tensor] = {}

    def setup(self, labeled, unlabeled=None) -> None:
        if self.setup_features:
            self._cached = {sid: f.float() for sid, f in zip(labeled.ids, labeled.features)}

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        a = self.cfg.ratio
        return a * self.adapter(f) + (1 - a) * f

    def predict_features(self, features: torch.Tensor) -> Prediction:
        scale = self.backbone.logit_scale
        f = F.normalize(self.adapt(features), dim=-1)
        logits = scale * f @ self.text_weights.t().to(f.dtype)
        return Prediction(logits=logits, scores=softmax_scores(logits, scale))

    @torch.no_grad()
    def _features(self, batch) -> torch.Tensor:
        if self.cfg.train_features == "augmented":
            return self.frozen_image(batch, "weak").pooled.float()
        return torch.stack([self._cached[sid] for sid in batch.ids])

    def training_step(self, batch, state) -> StepOutput:
        logits = self.predict_features(self._features(batch)).logits
        loss = F.cross_entropy(logits, batch.y)
        return StepOutput(loss=loss, logs={"acc": float((logits.argmax(-1) == batch.y).float().mean())})
