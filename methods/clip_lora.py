"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024).

Low-rank adapters on the query, key and value projections of every attention block of both towers
(rank 2, alpha 1, scaling alpha / sqrt(r), dropout 0.25 on the adapter input, A kaiming-uniform, B zero;
see ``methods/_lora.py`` for the adapter and why it is not peft's). Logits = CLIP's logit scale x
cos(image, text("a photo of a {}.")); the text tower is adapted too, so during training the class
text features are recomputed at every step (as the official ``run_lora`` does), and in eval mode they
are computed once with the merged weights. Only the LoRA matrices train (AdamW, cosine per iteration,
500 x shots iterations: ``configs/methods/clip_lora.yaml``). Known-scores: MSP and MCM.

The method changes modules inside the backbone (``modifies_backbone``): the engine gives it its own
deep copy, so the shared backbone and its feature cache are never affected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F

from benchmark.method import Method, Prediction, StepOutput, prompt_classname, softmax_scores
from benchmark.registry import register_method

from ._lora import LoRAAttention, apply_lora


@dataclass
class CLIPLoRAConfig:
    encoder: str = "both"  # [code] towers with LoRA: both | vision | text
    # [code] which blocks: all | bottom | mid | up | half-bottom | half-up | top1..3 | "i,j,..."
    position: str = "all"
    matrices: List[str] = field(default_factory=lambda: ["q", "k", "v"])  # [code] subset of q, k, v, o
    rank: int = 2  # [code] r
    alpha: float = 1.0  # [code] lora_alpha; scaling = alpha / sqrt(r)
    dropout: float = 0.25  # [code] dropout on the LoRA input (training only)
    # [code] one template for every dataset (the official dataset files all end with this one);
    # "" uses the dataset's own template instead
    template: str = "a photo of a {}."


@register_method("clip_lora")
class CLIPLoRA(Method):
    """CLIP-LoRA: low-rank adapters on q, k, v of both CLIP towers (CVPRW 2024)."""

    Config = CLIPLoRAConfig
    # declared ranges of the numeric parameters (benchmark/checks.py)
    param_ranges = {"rank": "[1, inf)", "alpha": "(0, inf)", "dropout": "[0, 1)"}
    modifies_backbone = True
    random_text_tower = True  # LoRA dropout in the text tower: train.short_text changes its draws

    def __init__(self, cfg: CLIPLoRAConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        if cfg.encoder in ("both", "vision"):
            backbone.require_vit(  # the official CLIP-LoRA adapts ViT attention blocks only
                f"clip_lora.params.encoder={cfg.encoder} (LoRA on the image tower's attention blocks, "
                f"which the official CLIP-LoRA defines for ViT backbones only; encoder=text adapts the "
                f"text tower alone and runs on a ResNet CLIP)")
        if not backbone.attention_modules(cfg.encoder if cfg.encoder in ("vision", "text") else "both"):
            raise ValueError("CLIP-LoRA found no attention blocks in the backbone")
        self.lora_layers: List[LoRAAttention] = apply_lora(
            backbone, cfg.encoder, cfg.position, cfg.matrices, cfg.rank, cfg.alpha, cfg.dropout)
        template = cfg.template or ctx.template
        if "{}" not in template:
            raise ValueError(f"clip_lora.params.template needs a '{{}}' for the class name, got {template!r}")
        prompts = [template.format(prompt_classname(c)) for c in ctx.classnames]
        self.register_buffer("tokens", backbone.tokenize(prompts), persistent=False)
        self._eval_text = None

    # -- modes: LoRA merged for eval, unmerged for training ----------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)  # the backbone wrapper keeps CLIP in eval mode (and merges the LoRA)...
        for layer in self.lora_layers:  # ... so the LoRA layers get the requested mode explicitly
            layer.train(mode)
        self._eval_text = None
        return self

    def load_learned_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        super().load_learned_state_dict(sd)
        self.train(self.training)  # re-merge with the loaded matrices if in eval mode

    # -- model ------------------------------------------------------------------------------------
    def class_text(self) -> torch.Tensor:
        """L2-normalised class text features through the (LoRA-adapted) text tower."""
        if self.training:
            return F.normalize(self.backbone.encode_text(self.tokens), dim=-1)
        if self._eval_text is None:
            with torch.no_grad():
                self._eval_text = F.normalize(self.backbone.encode_text(self.tokens), dim=-1)
        return self._eval_text

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.backbone.encode_image(images).pooled, dim=-1)
        text = self.class_text()
        return self.backbone.logit_scale * f @ text.t().to(f.dtype)

    def training_step(self, batch, state) -> StepOutput:
        logits = self.logits(batch.x["weak"])
        loss = F.cross_entropy(logits.float(), batch.y)
        return StepOutput(loss=loss, logs={"acc": float((logits.argmax(-1) == batch.y).float().mean())})

    def predict(self, images: torch.Tensor) -> Prediction:
        logits = self.logits(images)
        return Prediction(logits=logits, scores=softmax_scores(logits, self.backbone.logit_scale))
