"""CFSG-CLIP (Li, Huang, Guan, CVPR 2025): CLIP-driven coarse-to-fine semantic guidance for
fine-grained open-set semi-supervised learning. Equations: SPEC section 6 and the slides.

Coarse branch (semantic filtering module): the image's CLS token z~_c and patch tokens z_ci are
mapped into the joint space (ln_post, proj); learnable coarse prompts give class text features t_c.
For the guiding class m, s_ci = sim(z_ci, t_c^m); the top-k patches by s are kept and weighted by a
softmax of sim(z_ci, z~_c); their weighted sum is the filtered local feature z_c.

Fine branch (visual-semantic injection): a learnable projection proj(z_c) enters the image encoder as
an extra token, re-inserted at the input of layers 1..D (its outputs discarded) and propagating
through layers D+1..T. The fine global feature z~_f is the token's final state (default) or the fine
pass's CLS (``fine_global: cls``, the other reading of the ambiguous equation); the same filtering
on the fine pass's patches with the fine prompts t_f gives z_f.

The patch features the filtering module ranks and pools are the final layer's patch tokens
through ln_post and proj (``patch_features: final``, the SPEC's reading) or the value-path patch
features of MaskCLIP and LoCoOp (``patch_features: value``: the last block's value projection,
out_proj, residual and MLP without the query-key attention, then ln_post and proj; the backbone's
``value_local``, shared with LoCoOp). Real CLIP's final-layer patch tokens are known to highlight
the background rather than the object (CLIP Surgery's "opposite visualization"), the value path
to localise (MaskCLIP); the paper's Figure 5 shows object parts selected.

Training (dual branch): CE on the four heads p~_c, p_c, p~_f, p_f = softmax(sim(., t)/tau) (tau =
1 / the backbone's logit scale unless set) for labeled images; for unlabeled images, hard
pseudo-labels from the weak view (no gradient), a FixMatch confidence mask F, and CE on the strong
view, weighted by lambda_c (coarse heads) and lambda_f (fine heads). Inference fuses the four
heads (``fusion``: the mean of the four probability vectors, of the two global heads' only, or one
head).

Every value the paper does not publish is a config default (SPEC section 6, tagged [default]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.method import Method, Prediction, StepOutput
from benchmark.registry import register_method
from benchmark.ssl import fixmatch_loss

from ._prompts import PromptMethod
from ._text_prompts import ContextPrompts

HEADS = ("coarse_global", "coarse_local", "fine_global", "fine_local")
# inference fusions besides one head: the mean probability of every active head, of the global ones
FUSIONS = ("mean_prob", "mean_global")
PATCH_FEATURES = ("final", "value")


def backbone_tau(backbone) -> float:
    """The temperature that stands for the backbone's own logit scale: 1 / exp(logit_scale).
    CLIP was trained with logits = exp(logit_scale) * cos, so cos / tau with this tau is on the scale
    the backbone's softmax was trained at (OpenAI's weights: exp(log 100) = 100, tau = 0.01 up to
    the float32 rounding of exp(log 100) = 100.0000076)."""
    return float(1.0 / backbone.logit_scale.detach())


def _spans(sizes):
    """``[(start, stop), ...]`` of consecutive blocks of the given sizes."""
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


@dataclass
class CFSGConfig:
    n_ctx: int = 4  # [default] context tokens per prompt set
    ctx_init: str = "a photo of a"  # [default] initial words of both prompt sets ("" = N(0, 0.02))
    top_k: int = 20  # [default] k patches kept by the semantic filtering module
    depth: int = 9  # [default] D: layers that re-insert the injected token
    # [default] temperature of the four heads (logits = cos / tau). None (YAML null): 1 / the
    # loaded backbone's logit scale (1 / exp(logit_scale)), which is 0.01 exactly for OpenAI's
    # weights (logit scale 100) and ~0.057 for the embedded tiny CLIP (17.4); a number overrides it
    tau: Optional[float] = None
    threshold: float = 0.95  # [default] FixMatch confidence threshold of the mask F
    lambda_c: float = 1.0  # [default] weight of the coarse unlabeled terms
    lambda_f: float = 1.0  # [default] weight of the fine unlabeled terms
    # which feature is the fine global feature z~_f: "token" (the injected token's final state,
    # our default reading) or "cls" (the fine pass's CLS token)
    fine_global: str = "token"
    # the mask F of each unlabeled term: "per_head" (each head's own weak confidence) [default]
    # or "coarse_global" (one mask from the coarse global head for all four terms)
    mask_source: str = "per_head"
    # softmax temperature of the patch weights w_ci = softmax(sim(z_ci, z~_c) / T); the paper's
    # equation has T = 1
    weight_temperature: float = 1.0
    # inference fusion: "mean_prob" (mean of the four probability vectors), "mean_global" (mean of
    # the two global heads' probabilities, coarse and fine) or one head's name (configs/methods/cfsg_clip.yaml
    # says which is the default and why)
    fusion: str = "mean_prob"
    # the patch features of the filtering module (both branches): "final" (final-layer patch tokens
    # through ln_post + proj) or "value" (MaskCLIP/LoCoOp value path of the last block, then
    # ln_post + proj); the YAML says which is the default and why
    patch_features: str = "final"
    # [default] speed: a training step runs the frozen coarse pass of its three views (labeled,
    # unlabeled weak and strong) as one batch and the fine pass of the two views with gradients as
    # one batch (three image-tower passes instead of six; each row's computation is unchanged, the
    # losses equal up to float rounding); False: one pass per view and branch
    batch_passes: bool = True
    # ablation switches
    fine_branch: bool = True  # False: coarse branch only
    filtering: bool = True  # False: no filtering, CLS features only (the local heads are dropped)


@register_method("cfsg_clip")
class CFSGCLIP(PromptMethod, Method):
    """CFSG-CLIP: coarse-to-fine semantic guidance with semi-supervised training (CVPR 2025)."""

    Config = CFSGConfig
    # declared ranges of the numeric parameters (benchmark/checks.py)
    param_ranges = {"n_ctx": "[1, inf)", "top_k": "[1, inf)", "depth": "[1, inf)",
                    "tau": "(0, inf)", "threshold": "[0, 1]", "lambda_c": "[0, inf)",
                    "lambda_f": "[0, inf)", "weight_temperature": "(0, inf)"}
    uses_unlabeled = True
    labeled_views = ("weak",)
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: CFSGConfig, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        backbone.require_vit("CFSG-CLIP (its filtering module selects patch tokens of the image "
                             "transformer and its fine branch injects them as prompt tokens at layer D)")
        if cfg.fine_global not in ("token", "cls"):
            raise ValueError(f"cfsg_clip.fine_global must be 'token' or 'cls', got {cfg.fine_global!r}")
        if cfg.mask_source not in ("per_head", "coarse_global"):
            raise ValueError(f"cfsg_clip.mask_source must be per_head or coarse_global, got {cfg.mask_source!r}")
        if cfg.fusion not in FUSIONS + HEADS:
            raise ValueError(f"cfsg_clip.fusion must be one of {FUSIONS + HEADS}, got {cfg.fusion!r}")
        if cfg.patch_features not in PATCH_FEATURES:
            raise ValueError(f"cfsg_clip.patch_features must be one of {PATCH_FEATURES}, "
                             f"got {cfg.patch_features!r}")
        if not 1 <= cfg.depth <= backbone.vision_layers:
            raise ValueError(f"cfsg_clip.depth={cfg.depth} must lie in [1, {backbone.vision_layers}] "
                             f"(the image tower has {backbone.vision_layers} layers)")
        if cfg.filtering and not 1 <= cfg.top_k <= backbone.num_patches:
            raise ValueError(f"cfsg_clip.top_k={cfg.top_k} must lie in [1, {backbone.num_patches}]")
        if cfg.tau is not None and not cfg.tau > 0:
            raise ValueError(f"cfsg_clip.tau must be > 0 or null (= 1 / the backbone's logit scale), "
                             f"got {cfg.tau!r}")
        # the effective temperature (reported in the logs and by tests)
        self.tau = backbone_tau(backbone) if cfg.tau is None else float(cfg.tau)
        self.coarse_prompts = ContextPrompts(backbone, ctx.classnames, cfg.n_ctx, cfg.ctx_init)
        if cfg.fine_branch:
            self.fine_prompts = ContextPrompts(backbone, ctx.classnames, cfg.n_ctx, cfg.ctx_init)
            # proj: joint space -> image-encoder width (nn.Linear's default initialisation [default])
            self.inject = nn.Linear(backbone.embed_dim, backbone.vision_width)
        # the SSL term needs unlabeled batches only when it is on (an instance override of the flag)
        self.uses_unlabeled = cfg.lambda_c > 0 or cfg.lambda_f > 0
        self.heads = tuple(h for h in HEADS if (cfg.fine_branch or not h.startswith("fine"))
                           and (cfg.filtering or not h.endswith("local")))
        if cfg.fusion not in FUSIONS and cfg.fusion not in self.heads:
            raise ValueError(f"cfsg_clip.fusion={cfg.fusion!r} is switched off by the ablation flags")
        self._init_cache()  # class text features: once in eval mode, once per training step

    # -- pieces -------------------------------------------------------------------------------
    def text_features(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Normalised class text features of the coarse and fine prompts (``t_f`` None without the
        fine branch): cached in eval mode; in training, computed once per step (a no-grad pass of
        the same step reuses them, detached)."""
        def compute():
            t_c = F.normalize(self.coarse_prompts(), dim=-1)
            t_f = F.normalize(self.fine_prompts(), dim=-1) if self.cfg.fine_branch else None
            return t_c, t_f
        return self.cached(compute)

    @staticmethod
    def semantic_filter(cls_feat: torch.Tensor, patches: torch.Tensor, text: torch.Tensor,
                        guide: torch.Tensor, k: int, weight_temperature: float = 1.0):
        """The semantic filtering module.

        cls_feat [B, E], patches [B, P, E], text [K, E] (normalised), guide [B] class indices.
        Returns (z [B, E] the weighted sum of the kept patches, idx [B, k] the kept patches,
        w [B, k] their weights)."""
        pn = F.normalize(patches, dim=-1)
        s = torch.einsum("bpe,be->bp", pn, text[guide])  # s_ci = sim(z_ci, t^m)
        idx = s.topk(k, dim=1).indices  # rank(s_ci) <= k
        kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        sim_cls = torch.einsum("bke,be->bk", F.normalize(kept, dim=-1), F.normalize(cls_feat, dim=-1))
        w = (sim_cls / weight_temperature).softmax(dim=1)
        return (w.unsqueeze(-1) * kept).sum(1), idx, w

    def head_scale(self):
        """1 / tau: the backbone's own logit scale (the tensor every other method multiplies its
        cosines by, so the logits are bit for bit on their scale) unless ``tau`` is set."""
        return self.backbone.logit_scale.detach() if self.cfg.tau is None else 1.0 / self.cfg.tau

    def _encode(self, images: torch.Tensor, **kw):
        """One image-tower pass; ``(output, patch features)``: the patch features of the filtering
        module (``patch_features``), None without filtering."""
        final = self.cfg.filtering and self.cfg.patch_features == "final"
        value = self.cfg.filtering and self.cfg.patch_features == "value"
        out = self.backbone.encode_image(images, return_patches=final, return_value_local=value, **kw)
        return out, (out.patches if final else out.value_local)

    def _logits(self, feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.head_scale() * (F.normalize(feat, dim=-1) @ text.t())

    def forward_heads(self, images: torch.Tensor, guide: Optional[torch.Tensor] = None,
                      keep_selection: bool = False) -> Dict[str, torch.Tensor]:
        """Logits of every active head. ``guide``: the guiding class per image (labels for labeled
        images); None = the coarse global prediction (unlabeled and test images)."""
        t_c, t_f = self.text_features()
        out, z_c, guide = self._coarse_heads(images, guide, t_c, keep_selection)
        if self.cfg.fine_branch:
            out.update(self._fine_heads(images, z_c, guide, t_f, keep_selection))
        return out

    def _coarse_heads(self, images: torch.Tensor, guide: Optional[torch.Tensor], t_c: torch.Tensor,
                      keep_selection: bool = False):
        """The coarse branch (frozen image tower, no learnable image-side parameter): its heads'
        logits, the filtered local feature z_c that the fine branch injects, and the guiding classes
        (``guide`` None, or the rows where it is negative: the coarse global prediction)."""
        cfg = self.cfg
        out: Dict[str, torch.Tensor] = {}
        coarse, coarse_patches = self._encode(images)
        out["coarse_global"] = self._logits(coarse.pooled, t_c)
        pred = out["coarse_global"].argmax(-1)
        guide = pred if guide is None else torch.where(guide < 0, pred, guide)  # no host sync
        if cfg.filtering:
            z_c = self._local_head(out, "coarse", coarse.pooled, coarse_patches, t_c, guide, keep_selection)
        else:
            z_c = coarse.pooled  # ablation "no filtering": the CLS feature is what gets injected
        return out, z_c, guide

    def _fine_heads(self, images: torch.Tensor, z_c: torch.Tensor, guide: torch.Tensor,
                    t_f: torch.Tensor, keep_selection: bool = False) -> Dict[str, torch.Tensor]:
        """The fine branch: proj(z_c) injected at layers 1..D of a second image-tower pass."""
        cfg = self.cfg
        out: Dict[str, torch.Tensor] = {}
        tok = self.inject(z_c.to(self.inject.weight.dtype)).unsqueeze(1)  # [B, 1, width]
        deep = [None] + [tok] * (cfg.depth - 1)  # re-inserted at layers 1..D, free after D
        fine, fine_patches = self._encode(images, prompts=tok, deep_prompts=deep,
                                          return_prompts=cfg.fine_global == "token")
        zf_global = fine.prompts[:, 0] if cfg.fine_global == "token" else fine.pooled
        out["fine_global"] = self._logits(zf_global, t_f)
        if cfg.filtering:
            self._local_head(out, "fine", fine.pooled, fine_patches, t_f, guide, keep_selection)
        return out

    def _local_head(self, out: Dict[str, torch.Tensor], branch: str, cls_feat: torch.Tensor,
                    patches: torch.Tensor, text: torch.Tensor, guide: torch.Tensor,
                    keep_selection: bool) -> torch.Tensor:
        """A branch's local head: the filtered local feature (returned) and its logits
        (``out[<branch>_local]``; the kept patches in ``out[selected_<branch>]`` when asked)."""
        z, idx, _ = self.semantic_filter(cls_feat, patches, text, guide, self.cfg.top_k,
                                         self.cfg.weight_temperature)
        out[f"{branch}_local"] = self._logits(z, text)
        if keep_selection:
            out[f"selected_{branch}"] = idx
        return z

    def _step_heads(self, batch):
        """The heads of one training step: (labeled, unlabeled weak (no gradient), unlabeled strong);
        the unlabeled ones None without unlabeled images. ``batch_passes`` off: one
        :meth:`forward_heads` per view (the weak one under no_grad), six image-tower passes of one
        view each. On: the coarse pass of every view as one batch (its image side is frozen, so no
        graph either way), then one fine pass for the weak view under no_grad and one for the
        labeled and strong views together: three passes, each row's computation unchanged (equal up
        to float rounding; tests/test_cfsg_clip.py)."""
        with_u = self.uses_unlabeled and batch.u is not None
        if not self.cfg.batch_passes:
            lab = self.forward_heads(batch.x["weak"], guide=batch.y)
            if not with_u:
                return lab, None, None
            with torch.no_grad():
                weak = self.forward_heads(batch.u["weak"])
            return lab, weak, self.forward_heads(batch.u["strong"])
        t_c, t_f = self.text_features()
        views = [batch.x["weak"]] + ([batch.u["weak"], batch.u["strong"]] if with_u else [])
        sizes = [v.shape[0] for v in views]
        images = torch.cat(views)
        # guiding classes: the labels for labeled images; the coarse global prediction of each
        # unlabeled view for itself (as forward_heads with guide None)
        guide = torch.cat([batch.y, batch.y.new_full((images.shape[0] - sizes[0],), -1)])
        out, z_c, guide = self._coarse_heads(images, guide, t_c)
        parts = [{h: v[a:b] for h, v in out.items()} for a, b in _spans(sizes)]
        if not with_u:
            if self.cfg.fine_branch:
                parts[0].update(self._fine_heads(images, z_c, guide, t_f))
            return parts[0], None, None
        lab, weak, strong = parts
        weak = {h: v.detach() for h, v in weak.items()}
        if self.cfg.fine_branch:
            (l0, l1), (w0, w1), (s0, s1) = _spans(sizes)
            with torch.no_grad():
                weak.update(self._fine_heads(images[w0:w1], z_c[w0:w1], guide[w0:w1], t_f.detach()))
            def rows(t):  # the labeled and strong rows
                return torch.cat([t[l0:l1], t[s0:s1]])
            fine = self._fine_heads(rows(images), rows(z_c), rows(guide), t_f)
            lab.update({h: v[:l1 - l0] for h, v in fine.items()})
            strong.update({h: v[l1 - l0:] for h, v in fine.items()})
        return lab, weak, strong

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch, state) -> StepOutput:
        cfg = self.cfg
        heads, weak, strong = self._step_heads(batch)
        sup = {h: F.cross_entropy(heads[h], batch.y) for h in self.heads}
        loss = sum(sup.values())
        logs = {f"ce_{h}": float(v.detach()) for h, v in sup.items()}
        if weak is not None:
            shared_mask = None
            if cfg.mask_source == "coarse_global":
                shared_mask = (weak["coarse_global"].float().softmax(-1).max(-1).values >= cfg.threshold)
            for h in self.heads:
                lam = cfg.lambda_c if h.startswith("coarse") else cfg.lambda_f
                if lam == 0:
                    continue
                lu, mask = fixmatch_loss(weak[h].float(), strong[h].float(), cfg.threshold)
                if shared_mask is not None:
                    pseudo = weak[h].argmax(-1)
                    mask = shared_mask.float()
                    lu = (F.cross_entropy(strong[h].float(), pseudo, reduction="none") * mask).mean()
                loss = loss + lam * lu
                logs[f"u_{h}"] = float(lu.detach())
                logs[f"mask_{h}"] = float(mask.mean())
        return StepOutput(loss=loss, logs=logs)

    # -- inference ----------------------------------------------------------------------------
    def fuse(self, heads: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused class probabilities [B, K]."""
        if self.cfg.fusion in FUSIONS:
            used = [h for h in self.heads if self.cfg.fusion == "mean_prob" or h.endswith("global")]
            return torch.stack([heads[h].float().softmax(-1) for h in used]).mean(0)
        return heads[self.cfg.fusion].float().softmax(-1)

    def predict(self, images: torch.Tensor) -> Prediction:
        heads = self.forward_heads(images)
        prob = self.fuse(heads)
        scores = {"msp": prob.max(-1).values}
        # MCM of the coarse global head: max softmax of the cosines at temperature 1
        scores["mcm_coarse"] = (heads["coarse_global"].float() / self.head_scale()).softmax(-1).max(-1).values
        return Prediction(logits=prob.clamp_min(1e-12).log(), scores=scores)

    def patch_selection(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Boolean masks [B, P] of the patches the filtering module keeps (for the Figure-5 plot)."""
        if not self.cfg.filtering:
            return {}
        heads = self.forward_heads(images, keep_selection=True)
        out = {}
        for name in ("selected_coarse", "selected_fine"):
            if name in heads:
                m = torch.zeros(images.shape[0], self.backbone.num_patches, dtype=torch.bool,
                                device=images.device)
                out[name.replace("selected_", "")] = m.scatter(1, heads[name], True)
        return out
