"""The method plugin contract.

A method is an ``nn.Module`` subclass of :class:`Method` in one file of ``methods/``, registered with
``@register_method("name")``, with a ``Config`` dataclass (the schema of ``params`` in its YAML).
The engine owns optimisation, schedules, AMP, seeding, checkpoints, evaluation and files: a method
never calls ``optimizer.step()`` and never writes files. What it implements:

* ``__init__(cfg, backbone, ctx)``: build learnable parts; ``ctx`` gives the K known class names
  (never OOD names), the dataset's template, shots and seed;
* optionally ``setup(labeled, unlabeled)``: called once before training (and before a resumed run
  loads its checkpoint) with the labeled set (:class:`LabeledSet`: sample ids, labels and, when
  ``setup_features`` is true, the frozen CLIP features of the test view, cached across methods and
  seeds) and, when ``setup_unlabeled`` is true, the unlabeled pool (:class:`UnlabeledPool`: ids and
  features, never labels). A method may create parameters here (e.g. a cache of labeled features);
* ``training_step(batch, state) -> StepOutput`` (if ``trains``): a differentiable loss and logs;
  ``batch.ids`` / ``batch.u_ids`` are the sample ids of the images;
* optionally ``labeled_train_rows()``: the labeled rows the training stream draws from (default all);
* optionally ``after_train()``: called once after the last training step (right after ``setup`` for
  a method that does not train), before the learned state is saved and the method is evaluated;
* ``predict(images) -> Prediction``: closed-set logits over the K known classes and named
  known-scores (higher = more likely known);
* optionally ``predict_features(features)`` when ``frozen_image_encoder`` is true: the prediction from
  ``backbone.encode_image(images).pooled`` alone, so the engine may serve cached features.

Learned state (what is checkpointed and saved) is every parameter with ``requires_grad`` plus the
buffers named in ``learned_buffers``. CLIP's own weights are frozen by the backbone wrapper.
A method that does not train (``trains`` false on the instance: a class attribute or a property)
gets no optimiser, no training loop and no checkpoint; its learned state, if any, is still saved.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import CLIPBackbone, ImageOutput

Tensor = torch.Tensor


@dataclass
class NoParams:
    """Config of a method without parameters of its own."""


@dataclass
class MethodContext:
    classnames: List[str]  # the K known class names, canonical order
    template: str  # the dataset's zero-shot template, with one "{}"
    dataset: str
    shots: int
    seed: int

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass
class Batch:
    """One training step's data. ``x``/``u`` map a view name ("weak", "strong", "test") to images.

    ``ids`` / ``u_ids`` are the sample ids of the labeled / unlabeled images, in batch order: the
    dataset's stable ids (``Split.ids``, the strings of the split manifest; relative image paths on
    real data), so a method can keep per-sample state (memory banks, pseudo-label histories) and the
    engine can key per-sample caches on them. Unlabeled images come without labels."""

    x: Dict[str, Tensor]
    y: Tensor  # [B] labels in [0, K) of the labeled images
    u: Optional[Dict[str, Tensor]] = None
    ids: List[str] = field(default_factory=list)  # [B] sample ids of x's images
    u_ids: Optional[List[str]] = None  # [Bu] sample ids of u's images (None without u)
    #: engine-served frozen image-tower outputs of the labeled "weak" view (``data.cached_views``,
    #: for methods with ``frozen_train_outputs``): ``{"weak": ImageOutput}``; read them through
    #: :meth:`Method.frozen_image`, which encodes ``x[view]`` when nothing is served
    features: Optional[Dict[str, ImageOutput]] = None


@dataclass
class LabeledSet:
    """What ``setup`` gets about the labeled set: the split manifest's labeled samples, in manifest
    order. ``features`` are CLIP's pooled image features (unnormalised, as ``predict_features``
    gets them) of the test-transform view through the frozen backbone, on the method's device.
    ``augmented(rounds)`` encodes ``rounds`` train-view ("weak") augmentations of every labeled image
    ([rounds, N, E], deterministic per seed)."""

    ids: List[str]
    labels: Tensor  # [N] int64 in [0, K)
    features: Optional[Tensor] = None  # [N, E] when the method sets setup_features
    augmented: Optional[Callable[[int], Tensor]] = None


@dataclass
class UnlabeledPool:
    """What ``setup`` gets about the unlabeled pool (when the method sets ``setup_unlabeled``): the
    ids of every training image and their test-view features, never their labels."""

    ids: List[str]
    features: Optional[Tensor] = None  # [M, E] when the method sets setup_features


@dataclass
class StepState:
    step: int  # 0-based optimisation step
    total_steps: int
    epoch: int
    steps_per_epoch: int


@dataclass
class StepOutput:
    loss: Tensor
    logs: Dict[str, float] = field(default_factory=dict)


@dataclass
class Prediction:
    logits: Tensor  # [B, K] closed-set logits
    scores: Dict[str, Tensor]  # name -> [B] known-score, higher = more likely known


class Method(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoParams
    #: False for training-free methods (zero-shot, Tip-Adapter): the engine skips optimisation. The
    #: engine reads the *instance* (a subclass may make it a property of its config); a class-level
    #: ``False`` also keeps ``train``/``ssl`` settings out of the run's config hash
    trains: ClassVar[bool] = True
    #: ``setup`` gets frozen CLIP test-view features of the labeled set (and of the unlabeled pool)
    setup_features: ClassVar[bool] = False
    #: ``setup`` also gets the unlabeled pool's ids (and features): never its labels
    setup_unlabeled: ClassVar[bool] = False
    #: True if ``training_step`` consumes ``batch.u`` itself (then the engine's generic FixMatch loop
    #: is not added on top)
    uses_unlabeled: ClassVar[bool] = False
    #: augmentation views of labeled and unlabeled images the method wants in each batch;
    #: known views: "weak" (train transform), "strong" (weak + RandAugment), "test" (eval transform)
    labeled_views: ClassVar[Tuple[str, ...]] = ("weak",)
    unlabeled_views: ClassVar[Tuple[str, ...]] = ("weak", "strong")
    #: predictions depend on the image only through the frozen CLIP image feature
    frozen_image_encoder: ClassVar[bool] = False
    #: True if the method changes modules inside the backbone (LoRA): it gets its own copy
    modifies_backbone: ClassVar[bool] = False
    #: True if training draws random numbers inside the text tower (LoRA's dropout): the shortened
    #: text tower (``train.short_text``) then draws fewer of them (none for the positions after the
    #: EOT), so the option joins the config hash of this method's runs
    random_text_tower: ClassVar[bool] = False
    #: declared range of each numeric ``Config`` field, e.g. ``{"n_ctx": "[1, inf)"}`` (checked
    #: before a run, see benchmark/checks.py)
    param_ranges: ClassVar[Dict[str, str]] = {}
    #: the :class:`ImageOutput` fields ("pooled", "value_local", "patches") that ``training_step``
    #: reads from the *frozen* image tower for its labeled "weak" view through :meth:`frozen_image`;
    #: with ``data.cached_views: N`` the engine then serves them from N cached augmented views per
    #: image instead of loading and encoding images (empty: the option does not apply)
    frozen_train_outputs: ClassVar[Tuple[str, ...]] = ()
    #: names of buffers that are learned state (e.g. a cache of class prototypes)
    learned_buffers: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, cfg: Any, backbone: CLIPBackbone, ctx: MethodContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.ctx = ctx

    # -- to implement -------------------------------------------------------------------------
    def setup(self, labeled: LabeledSet, unlabeled: Optional[UnlabeledPool] = None) -> None:
        """Called once before training with the labeled set (and the unlabeled pool if declared)."""

    def after_train(self) -> None:
        """Called once after training (after ``setup`` for a method that does not train)."""

    def training_step(self, batch: Batch, state: StepState) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} declares trains=True but has no training_step")

    def predict(self, images: Tensor) -> Prediction:
        if self.frozen_image_encoder:
            return self.predict_features(self.backbone.encode_image(images).pooled)
        raise NotImplementedError

    def predict_features(self, features: Tensor) -> Prediction:
        raise NotImplementedError

    def patch_selection(self, images: Tensor) -> Dict[str, Tensor]:
        """Optional: boolean masks ``[B, P]`` of the image patches the method selects, by name; the
        engine saves them for a few test images and the report draws them over the images."""
        return {}

    def labeled_train_rows(self) -> Optional[Sequence[int]]:
        """Optional, read after ``setup``: the rows of the labeled set (positions in the
        :class:`LabeledSet`'s order) that the labeled training stream draws from; None (the default)
        = every labeled image. A method that keeps labeled images out of training (a hold-out for its
        own model selection) names the others, so that its batches hold only images it trains on; the
        number of steps is still counted on the whole labeled set (one budget for every method)."""
        return None

    def param_groups(self) -> List[Dict[str, Any]]:
        """Optimizer parameter groups (default: every trainable parameter in one group)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # -- learned state ------------------------------------------------------------------------
    def learned_state_dict(self) -> Dict[str, Tensor]:
        sd = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
        for b in self.learned_buffers:
            sd[b] = getattr(self, b).detach().clone()
        return sd

    def load_learned_state_dict(self, sd: Dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad} | set(self.learned_buffers)
        if set(sd) != expected:
            raise RuntimeError(f"learned state mismatch: missing {sorted(expected - set(sd))}, "
                               f"unexpected {sorted(set(sd) - expected)}")
        with torch.no_grad():
            for n, t in sd.items():
                target = params[n] if n in params else getattr(self, n)
                target.copy_(t)

    # -- helpers shared by many methods -------------------------------------------------------
    def frozen_image(self, batch: Batch, view: str = "weak") -> ImageOutput:
        """The frozen image tower's outputs (``frozen_train_outputs``) for ``batch.x[view]``: served
        by the engine's view cache when on, else encoded here (no gradient reaches the tower)."""
        if batch.features is not None and view in batch.features:
            return batch.features[view]
        fields = self.frozen_train_outputs
        with torch.no_grad():
            return self.backbone.encode_image(batch.x[view], return_value_local="value_local" in fields,
                                              return_patches="patches" in fields)

    def text_features(self, texts: List[str]) -> Tensor:
        """L2-normalised text features of ``texts`` through the frozen text tower."""
        with torch.no_grad():
            return F.normalize(self.backbone.encode_text(self.backbone.tokenize(texts)), dim=-1)

    def class_prompts(self) -> List[str]:
        return [self.ctx.template.format(prompt_classname(c)) for c in self.ctx.classnames]


def prompt_classname(name: str) -> str:
    """The text a class name puts into a prompt: every ``_`` becomes a space, as every official
    implementation does before tokenising (CoOp / LoCoOp / PLOT / MaPLe ``PromptLearner``,
    CLIP-Adapter's and CLIP-LoRA's text classifiers). The one place that does it for every method:
    hand-crafted templates (:meth:`Method.class_prompts`), CLIP-LoRA and the prompt learners."""
    return name.replace("_", " ")


def softmax_scores(logits: Tensor, scale: Tensor | float) -> Dict[str, Tensor]:
    """Standard known-scores from logits = scale * cosine: MSP of the logits and MCM (max softmax
    of the cosine similarities at temperature 1, Ming et al. 2022)."""
    return {
        "msp": logits.softmax(-1).max(-1).values,
        "mcm": (logits / scale).softmax(-1).max(-1).values,
    }
