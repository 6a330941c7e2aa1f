"""Tip-Adapter-F (Zhang et al., ECCV 2022): Tip-Adapter with fine-tuned cache keys (official ``run_tip_adapter_F``).
Keys initialised from the cache, trained with cross-entropy on augmented labeled views at the initial
alpha/beta (AdamW, eps 1e-4), then alpha/beta searched with the trained keys. The official script keeps
the epoch of best *test* accuracy; we keep the last and search on held-out labeled images, which never
join the cache nor the training batches (``val_fraction``, our choice)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from benchmark.method import StepOutput
from benchmark.registry import register_method

from .tip_adapter import TipAdapter, TipAdapterConfig


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    eps: float = 1e-4  # [code] torch.optim.AdamW(..., eps=1e-4)


@register_method("tip_adapter_f")
class TipAdapterF(TipAdapter):
    Config = TipAdapterFConfig
    param_ranges = {**TipAdapter.param_ranges, "eps": "(0, inf)"}  # declared ranges (benchmark/checks.py)
    trains = True
    labeled_views = ("weak",)
    frozen_train_outputs = ("pooled",)  # the step reads the frozen image tower only (Method.frozen_image)
    learned_buffers = ("cache_values", "alpha", "beta")  # cache_keys is a trained parameter

    def install_cache(self) -> None:
        del self.cache_keys  # a trained parameter here, not a buffer
        self.cache_keys = nn.Parameter(self.search_cache[0].clone())
        self.cache_values = self.search_cache[1]
        self.search_cache = (self.cache_keys, self.cache_values)  # the search scores the trained keys

    def param_groups(self):
        return [{"params": [self.cache_keys], "eps": self.cfg.eps}]

    def labeled_train_rows(self):
        return self.fit_rows  # the held-out rows never reach a training batch

    def training_step(self, batch, state) -> StepOutput:
        f = F.normalize(self.frozen_image(batch).pooled.float(), dim=-1)
        logits = self.logits(f, self.cache_keys, self.cache_values, self.alpha, self.beta)
        return StepOutput(loss=F.cross_entropy(logits, batch.y),
                          logs={"acc": float((logits.argmax(-1) == batch.y).float().mean())})
