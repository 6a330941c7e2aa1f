"""Tip-Adapter (Zhang et al., ECCV 2022): a training-free cache model of the labeled CLIP features.
Official gaopengcuhk/Tip-Adapter: logits(f) = s f W^T + alpha exp(-beta (1 - f K^T)) V; f the normalised
image feature, W the text classifier, s CLIP's logit scale (officially 100), K the normalised mean of
``augment_epochs`` augmented views of the labeled images, V their one-hot labels. alpha/beta are grid-
searched (``search_hp``) on validation data only: ours (no split has one) is a seeded per-class share
``val_fraction`` of the labeled set, scored against a cache of the others; the final cache holds all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from benchmark.method import Method, Prediction, softmax_scores
from benchmark.registry import register_method


@dataclass
class TipAdapterConfig:
    init_alpha: float = 1.17  # [code] configs/imagenet.yaml and oxford_pets.yaml (fgvc.yaml: 5)
    init_beta: float = 1.0  # [code] every config
    search: bool = True  # [code] search_hp
    search_scale: Tuple[float, float] = (7.0, 3.0)  # [code] (beta, alpha) upper ends
    search_step: Tuple[int, int] = (200, 20)  # [code] grid points for (beta, alpha)
    augment_epochs: int = 10  # [code] augment_epoch (0: the test view, our option)
    val_fraction: float = 0.2  # [default] share of each class's labeled images held out for the search


def holdout(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Rows held out for validation: round(fraction x shots) per class (at least 1, one kept)."""
    g, out = torch.Generator().manual_seed(int(seed)), []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten().cpu()
        n = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if fraction > 0 else 0
        out += rows[torch.randperm(len(rows), generator=g)[:n]].tolist()
    return torch.tensor(sorted(out), dtype=torch.int64)


@register_method("tip_adapter")
class TipAdapter(Method):
    Config = TipAdapterConfig
    param_ranges = {"init_alpha": "[0, inf)", "init_beta": "[0, inf)", "search_scale": "(0, inf)",  # checks.py
                    "search_step": "[1, inf)", "augment_epochs": "[0, inf)", "val_fraction": "[0, 1)"}
    trains = False
    frozen_image_encoder = True
    setup_features = True
    learned_buffers = ("cache_keys", "cache_values", "alpha", "beta")

    def __init__(self, cfg: TipAdapterConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        self.register_buffer("text_weights", self.text_features(self.class_prompts()))
        for name, v in (("alpha", cfg.init_alpha), ("beta", cfg.init_beta)):
            self.register_buffer(name, torch.tensor(float(v)))
        self.register_buffer("cache_keys", torch.zeros(0, backbone.embed_dim))
        self.register_buffer("cache_values", torch.zeros(0, ctx.num_classes))

    def setup(self, labeled, unlabeled=None) -> None:
        n = self.cfg.augment_epochs
        feats = labeled.augmented(n).mean(0) if n else labeled.features
        self.keys_all = F.normalize(feats.float(), dim=-1)
        self.values_all = F.one_hot(labeled.labels, self.ctx.num_classes).float()
        self.val_rows = holdout(labeled.labels, self.cfg.val_fraction, self.ctx.seed).to(feats.device)
        self.val_features = F.normalize(labeled.features[self.val_rows].float(), dim=-1)
        self.val_labels = labeled.labels[self.val_rows]
        keep = torch.ones(len(labeled.ids), dtype=torch.bool, device=feats.device)  # rows not held out
        self.fit_rows = keep.index_fill_(0, self.val_rows, False).nonzero().flatten()
        self.search_cache = (self.keys_all[self.fit_rows], self.values_all[self.fit_rows])
        self.install_cache()

    def install_cache(self) -> None:  # every labeled image; the search uses a cache without its val rows
        self.cache_keys, self.cache_values = self.keys_all, self.values_all

    def logits(self, f: torch.Tensor, keys, values, alpha, beta) -> torch.Tensor:
        """Tip-Adapter's logits of L2-normalised features ``f`` with the given cache."""
        clip = self.backbone.logit_scale * f @ self.text_weights.t()
        return clip + alpha * torch.exp(-beta * (1 - f @ keys.t())) @ values

    def predict_features(self, features: torch.Tensor) -> Prediction:
        f = F.normalize(features.float(), dim=-1)
        logits = self.logits(f, self.cache_keys, self.cache_values, self.alpha, self.beta)
        return Prediction(logits=logits, scores=softmax_scores(logits, self.backbone.logit_scale))

    @torch.no_grad()
    def after_train(self) -> None:
        if not self.cfg.search or len(self.val_rows) == 0:
            return  # 1 shot, or search off: the initial alpha and beta
        (keys, values), f = self.search_cache, self.val_features
        (sb, sa), (nb, na), best = self.cfg.search_scale, self.cfg.search_step, (-1.0, 0.0, 0.0)
        clip, aff = self.backbone.logit_scale * f @ self.text_weights.t(), f @ keys.t()  # as logits(), once
        for beta in [i * (sb - 0.1) / nb + 0.1 for i in range(nb)]:
            e = torch.exp(-beta * (1 - aff))
            for alpha in [i * (sa - 0.1) / na + 0.1 for i in range(na)]:
                pred = (clip + alpha * e @ values).argmax(-1)
                acc = float((pred == self.val_labels).float().mean())
                if acc > best[0]:  # strictly better: the first best in grid order wins, as the official
                    best = (acc, alpha, beta)
        self.alpha.fill_(best[1])
        self.beta.fill_(best[2])
