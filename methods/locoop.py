"""LoCoOp (Miyai et al., "LoCoOp: Few-Shot Out-of-Distribution Detection via Prompt Learning",
NeurIPS 2023; official code AtsuMiyai/LoCoOp, ``trainers/locoop.py`` and ``clip_w_local``).

CoOp's prompt and cross-entropy, plus an OOD regulariser on CLIP's local features: the last
block's value path of every patch token (``out_proj(W_v ln_1(x) + b_v) + x``, then the MLP, then
``ln_post`` and ``proj``, as ``clip_w_local``), scored against the same class text features with
the same logit scale as the global feature. A local feature whose top-K classes (of its softmax)
exclude the image's label is treated as ID-irrelevant background and its class distribution is
pushed to maximum entropy:

    L = CE(logits, y) + lambda * L_ood,   L_ood = -mean_{selected} H(p),
    H(p) = -sum_c p_c log(p_c + 1e-5)                                   (official entropy_select_topk)

with L_ood = 0 when no local feature is selected. Known-scores (higher = more likely known):
``mcm`` = max softmax(cos / T) of the global feature, ``gl_mcm`` = mcm + max over local features of
max softmax(local cos / T) (the official ``test_ood`` divides the logits by 100, i.e. by OpenAI
CLIP's logit scale; we divide by the backbone's own logit scale), and ``msp``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.errors import ConfigError
from benchmark.method import Prediction, StepOutput
from benchmark.registry import register_method

from .coop import CoOp, CoOpConfig


@dataclass
class LoCoOpConfig(CoOpConfig):
    lambda_ood: float = 0.25  # [paper][code] lambda (--lambda_value)
    # [default] top-K = round(top_k_fraction x K), rounded half up, at least 1 (the paper uses
    # 200 of ImageNet's 1000 classes = 20%); top_k > 0 sets K directly
    top_k_fraction: float = 0.2
    top_k: int = 0
    temperature: float = 1.0  # [paper][code] T of MCM / GL-MCM


def entropy_of_selected(local_logits: torch.Tensor, labels: torch.Tensor, top_k: int):
    """LoCoOp's ``entropy_select_topk``: ``local_logits`` ``[B, P, K]``; returns (mean entropy of the
    local class distributions whose top-k classes exclude the label (0 if none), selection mask
    ``[B, P]``)."""
    b, p, k = local_logits.shape
    prob = local_logits.reshape(b * p, k).softmax(-1)
    top = prob.topk(min(top_k, k), dim=-1).indices
    has_label = (top == labels.repeat_interleave(p).unsqueeze(1)).any(dim=1)
    sel = prob[~has_label]
    if sel.shape[0] == 0:
        ent = local_logits.new_zeros(())
    else:
        ent = -(sel * torch.log(sel + 1e-5)).sum(-1).mean()
    return ent, (~has_label).reshape(b, p)


@register_method("locoop")
class LoCoOp(CoOp):
    """LoCoOp: CoOp + entropy maximisation on label-irrelevant local features (NeurIPS 2023)."""

    Config = LoCoOpConfig
    # declared ranges of the numeric parameters (benchmark/checks.py)
    param_ranges = {"n_ctx": "[1, inf)", "lambda_ood": "[0, inf)", "top_k_fraction": "(0, 1]",
                    "top_k": "[0, inf)", "temperature": "(0, inf)"}
    frozen_image_encoder = False  # needs the local (value-path) features at evaluation too
    frozen_train_outputs = ("pooled", "value_local")  # both from the frozen tower (data.cached_views)

    def __init__(self, cfg: LoCoOpConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        K = ctx.num_classes
        self.top_k = cfg.top_k if cfg.top_k > 0 else max(1, math.floor(cfg.top_k_fraction * K + 0.5))
        if self.top_k > K:
            raise ConfigError(f"locoop top-K {self.top_k} exceeds the {K} known classes")
        if cfg.temperature <= 0:
            raise ConfigError("locoop.params.temperature must be > 0")

    def global_local_logits(self, images: torch.Tensor):
        return self.global_local_from(self.backbone.encode_image(images, return_value_local=True))

    def global_local_from(self, out):
        """(global logits [B, K], local logits [B, P, K]) from the image tower's pooled and
        value-path local features."""
        text = self.class_text()
        scale = self.backbone.logit_scale
        g = scale * F.normalize(out.pooled, dim=-1) @ text.t()
        loc = scale * F.normalize(out.value_local, dim=-1) @ text.t()
        return g, loc

    def training_step(self, batch, state) -> StepOutput:
        logits, local = self.global_local_from(self.frozen_image(batch, "weak"))
        loss_id = F.cross_entropy(logits, batch.y)
        ent, sel = entropy_of_selected(local, batch.y, self.top_k)
        loss_ood = -ent
        loss = loss_id + self.cfg.lambda_ood * loss_ood
        return StepOutput(loss=loss, logs={
            "loss_id": float(loss_id.detach()), "loss_ood": float(loss_ood.detach()),
            "selected": float(sel.float().mean()),
            "acc": float((logits.argmax(-1) == batch.y).float().mean())})

    def predict(self, images: torch.Tensor) -> Prediction:
        logits, local = self.global_local_logits(images)
        scale, T = self.backbone.logit_scale, self.cfg.temperature
        mcm = (logits / scale / T).softmax(-1).max(-1).values
        local_mcm = (local / scale / T).softmax(-1).max(-1).values.max(-1).values
        return Prediction(logits=logits, scores={
            "gl_mcm": mcm + local_mcm, "mcm": mcm, "msp": logits.softmax(-1).max(-1).values})

    def predict_features(self, features: torch.Tensor) -> Prediction:  # not used: needs local features
        raise NotImplementedError("LoCoOp predicts from images (it needs local features)")
