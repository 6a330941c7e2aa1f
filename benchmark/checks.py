"""Declared ranges and choices of every numeric and enumerated config value, checked before a run.

Each numeric field of the framework's config sections has its interval here (``RANGES``); a
method declares its own parameters' intervals in ``param_ranges`` (a class attribute of its
:class:`~benchmark.method.Method`), a dataset plugin its numeric options' in ``option_ranges``.
``tests/test_hardening.py`` fails when a numeric field has no declared range. :func:`check_config`
runs when the grid is built (before anything runs) and again in :meth:`Engine.run`; the error
names the key, the value and the range.

Interval notation: ``[a, b]`` closed, ``(a, b)`` open, ``inf`` unbounded; ``None`` (YAML
``null``) is always accepted where the field's type is optional.
"""
from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import ConfigError


class Range:
    """A numeric interval parsed from ``"[1, inf)"``-style notation; ``integer`` requires whole
    numbers."""

    _RX = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")

    def __init__(self, spec: str, integer: bool = False):
        m = self._RX.match(spec)
        if not m:
            raise ValueError(f"bad range {spec!r}: expected e.g. '[1, inf)' or '(0, 1]'")
        self.spec = spec.strip()
        self.lo_open, self.hi_open = m.group(1) == "(", m.group(4) == ")"
        self.lo, self.hi = float(m.group(2)), float(m.group(3))
        self.integer = integer

    def __contains__(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        if self.integer and float(v) != int(v):
            return False
        lo_ok = v > self.lo if self.lo_open else v >= self.lo
        hi_ok = v < self.hi if self.hi_open else v <= self.hi
        return lo_ok and hi_ok

    def __str__(self) -> str:
        return ("an integer in " if self.integer else "a number in ") + self.spec


# -- the framework's sections (benchmark/config.py); every numeric field is listed ----------------
RANGES: Dict[str, str] = {
    "shots": "[1, inf)",  # labeled images per known class
    "seed": "[0, 4294967295]",  # numpy seeds are unsigned 32-bit
    "train.lr": "(0, inf)",
    "train.momentum": "[0, 1)",
    "train.weight_decay": "[0, inf)",
    "train.betas": "[0, 1)",  # each of Adam's two betas
    "train.batch_size": "[1, inf)",
    "train.epochs": "[1, inf)",  # 0 epochs would report untrained metrics as a trained run's
    "train.iterations": "[1, inf)",
    "train.iterations_per_shot": "[1, inf)",
    "train.lr_min": "[0, inf)",
    "train.warmup_epochs": "[0, inf)",
    "train.warmup_lr": "[0, inf)",
    "train.grad_clip": "(0, inf)",
    "train.checkpoint_every": "[1, inf)",
    "train.checkpoint_every_s": "(0, inf)",
    "train.log_every": "[1, inf)",
    "ssl.weight": "[0, inf)",
    "ssl.threshold": "[0, 1]",
    "ssl.unlabeled_batch_size": "[1, inf)",
    "eval.batch_size": "[1, inf)",
    "eval.id_recall": "(0, 1]",  # a fraction of the labeled ID images kept as known
    "eval.explain_images": "[0, inf)",
    "eval.memo_mb": "[0, inf)",  # 0: off
    "data.crop_scale": "(0, 1]",  # RandomResizedCrop's area fractions (each)
    "data.randaugment_n": "[0, inf)",
    "data.randaugment_m": "[0, 30]",  # torchvision's RandAugment has 31 magnitude bins
    "data.num_workers": "[0, inf)",  # null: as many as the machine has (see loader.py)
    "data.cached_views": "[0, inf)",  # 0: off (a fresh augmentation every step)
}
CHOICES: Dict[str, Tuple[str, ...]] = {
    "train.optimizer": ("sgd", "adamw"),
    "train.epoch_over": ("labeled", "unlabeled"),
    "train.scheduler": ("cosine", "constant"),
    "train.schedule_unit": ("epoch", "iteration"),
    "train.amp": ("auto", "bf16", "off"),
}
SECTIONS = ("train", "ssl", "eval", "data", "backbone")


def check_value(key: str, value: Any, spec: str, integer: bool = False, where: str = "") -> None:
    """Raise :class:`ConfigError` naming ``key``, ``value`` and the range unless ``value`` (or each
    element of a list/tuple value) lies in ``spec``. ``None`` passes."""
    if value is None:
        return
    rng = Range(spec, integer)
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if v not in rng:
            what = "each value must be " if isinstance(value, (list, tuple)) else "expected "
            fix = {"shots": "--shots (or shots: in the experiment YAML)",
                   "seed": "--seeds (or seeds: in the experiment YAML)"}.get(key, f"--set {key}=<value>")
            raise ConfigError(f"{where + ': ' if where else ''}{key}={value!r} is out of range: "
                              f"{what}{rng}. Fix it in the YAML or with {fix}.")


def check_config(cfg) -> None:
    """Check a resolved :class:`~benchmark.config.RunConfig` against every declared range and
    choice (the framework's, its method's ``param_ranges`` and its dataset's ``option_ranges``)."""
    from .registry import DATASETS, METHODS

    run = f"{cfg.dataset}/{cfg.label}/{cfg.shots}-shot/seed{cfg.seed}"
    check_value("shots", cfg.shots, RANGES["shots"], True, run)
    check_value("seed", cfg.seed, RANGES["seed"], True, run)
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            key = f"{section}.{f.name}"
            value = getattr(obj, f.name)
            if key in RANGES:
                check_value(key, value, RANGES[key], where=run)
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{run}: {key}={value!r} is not one of {', '.join(CHOICES[key])}.")
    if cfg.device != "auto":
        import torch

        try:
            torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"{run}: device={cfg.device!r} is not a device: expected auto, cpu, cuda or "
                              f"cuda:N (--device)") from None
    lo, hi = cfg.data.crop_scale
    if lo > hi:
        raise ConfigError(f"{run}: data.crop_scale={list(cfg.data.crop_scale)!r}: the first value (the "
                          f"smallest crop) must not exceed the second")
    method_cls = METHODS.get(cfg.method)
    ranges = getattr(method_cls, "param_ranges", {}) or {}
    if is_dataclass(cfg.params):
        for f in fields(cfg.params):
            if f.name in ranges:
                check_value(f"{cfg.method}.params.{f.name}", getattr(cfg.params, f.name), ranges[f.name],
                            where=run)
    if cfg.dataset in DATASETS:
        opt_ranges = getattr(DATASETS.get(cfg.dataset), "option_ranges", {}) or {}
        for k, v in (cfg.data.options or {}).items():
            if k in opt_ranges:
                spec, integer, *off = (opt_ranges[k], False) if isinstance(opt_ranges[k], str) else opt_ranges[k]
                if off and (v is False or str(v).lower() in off[0]):
                    continue  # the option's "off" words
                check_value(f"data.options.{k}", v, spec, integer, where=run)


def parse_ints(values: Iterable[Any], key: str) -> List[int]:
    """Whole numbers of a grid axis (``shots``, ``seeds``), each checked against its range."""
    out = []
    spec = RANGES["shots" if key == "shots" else "seed"]
    for v in values:
        s = str(v).strip()
        try:
            f = float(s)
        except ValueError:
            f = None
        if f is None or isinstance(v, bool) or math.isnan(f) or f != int(f):
            raise ConfigError(f"{key}: {v!r} is not a whole number; expected comma-separated integers in "
                              f"{spec} (e.g. --{key} {'5,20' if key == 'shots' else '1,2,3'})")
        check_value(key, int(f), spec, True)
        out.append(int(f))
    if not out:
        raise ConfigError(f"{key}: no values given")
    return out


def numeric_fields(dc_type) -> List[Tuple[str, Any]]:
    """(name, type) of the fields of a dataclass type that hold numbers (int, float, Optional or
    tuple/list of them): the fields that must have a declared range."""
    import typing

    hints = typing.get_type_hints(dc_type)
    out = []
    for f in fields(dc_type):
        tp = hints.get(f.name)
        if _numeric_type(tp):
            out.append((f.name, tp))
    return out


def _numeric_type(tp) -> bool:
    import typing

    if tp in (int, float):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, tuple, list, Tuple, List, Sequence):
        inner = [a for a in args if a is not type(None) and a is not Ellipsis]
        return bool(inner) and all(_numeric_type(a) for a in inner)
    return False


def data_problem(engine, cfg, memo: Optional[dict] = None) -> Optional[str]:
    """What would make a run fail on its data (``--dry-run``): the dataset root and layout, the
    dataset options, and the training images each known class can give for ``shots``. None if
    nothing. ``memo`` caches the answer per (dataset, root, options, shots)."""
    import json

    import numpy as np

    from .errors import BenchmarkError
    from .protocol import num_known

    key = (cfg.dataset, cfg.data.root, json.dumps(cfg.data.options, sort_keys=True, default=str), cfg.shots)
    if memo is not None and key in memo:
        return memo[key]
    try:
        check_config(cfg)
        plugin = engine.dataset(cfg.dataset, cfg)
        names = plugin.classnames()
        held_out = getattr(cfg.eval, "split", "test")
        train, test = plugin.labels("train"), plugin.labels(held_out)
        K = num_known(len(names))
        counts = np.bincount(np.asarray(train), minlength=len(names))[:K]
        why = None
        if len(test) == 0:
            why = f"{cfg.dataset}: the {held_out} split is empty"
        elif counts.min() < cfg.shots:
            c = int(counts.argmin())
            short = int((counts < cfg.shots).sum())
            why = (f"{cfg.dataset}: {short} of the {K} known classes have fewer than shots={cfg.shots} "
                   f"training images (fewest: class {c} {names[c]!r} with {int(counts[c])}); use "
                   f"--shots {int(counts.min())} or fewer")
    except BenchmarkError as exc:
        why = str(exc).replace("\n", "\n      ")
    except Exception as exc:  # noqa: BLE001 - a plugin's own error, reported as the run's
        why = f"{type(exc).__name__}: {exc}"
    if memo is not None:
        memo[key] = why
    return why


def check_dataset_options(runs) -> None:
    """Build each distinct (dataset, options) plugin once: a misspelt or ill-typed dataset option
    fails before anything runs (plugins read no files when they are built)."""
    import inspect
    import json

    from .errors import BenchmarkError
    from .registry import DATASETS

    seen = set()
    for cfg in runs:
        key = (cfg.dataset, json.dumps(cfg.data.options, sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        cls = DATASETS.get(cfg.dataset)
        try:
            cls(root=cfg.data.root, **(cfg.data.options or {}))
        except BenchmarkError:
            raise
        except (TypeError, ValueError) as exc:
            params = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "root")]
            raise ConfigError(f"dataset {cfg.dataset!r}: bad data.options {cfg.data.options!r} ({exc}). "
                              f"Its options: {', '.join(params) or '(none)'}.") from None
