"""Semi-supervised building blocks shared by the engine's generic loop and by methods."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def fixmatch_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                  threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabeled term: CE between the weak view's hard pseudo-label (no gradient) and the
    strong view's prediction, kept where the weak view's max probability reaches ``threshold``.
    Returns (loss averaged over the whole unlabeled batch, mask)."""
    probs = logits_weak.detach().softmax(-1)
    conf, pseudo = probs.max(-1)
    mask = (conf >= threshold).to(logits_strong.dtype)
    loss = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
    return loss, mask
