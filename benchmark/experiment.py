"""Experiments: a YAML that names a grid (methods x datasets x shots x seeds) and its overrides.

Keys: ``name``, ``description``, ``methods`` (a list whose entries are method names, variant labels
or names of method sets from ``configs/method_sets.yaml``, e.g. ``paper``; ``all`` = every registered
method, plugins included), ``datasets``, ``shots``, ``seeds``, ``backbone`` (model/pretrained/cache_dir),
``data_root``, ``dataset_options: {<dataset>: {...}}``, ``config`` (overrides for every method:
``train``/``ssl``/``eval``/``data``/``params`` sections), ``methods_config: {<method>: {...}}``,
``variants: {<label>: {method: <m>, config: {...}}}`` (named configurations of a method, usable in
``methods`` like a method name: ablation rows), ``table`` (``std_ddof``: 0 = population std as CoOp's parser, 1 = sample std), ``caption`` (lines
printed under every table: the budget rule, the tuning split), ``curve`` (see :func:`expand_curve`).
``launcher`` (resources for ``run_all.py --launcher local|slurm``: see :mod:`benchmark.launch`).

``base: <experiment>`` starts from another experiment (its keys and its ``.d`` presets) and replaces
the keys this file gives.

A folder ``<experiment>.d/`` beside the YAML may hold one ``<method>.yaml`` per method: each is that
method's ``methods_config`` entry (so every method's preset lives in its own file). A method given in
both places is an error.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import ROOT
from .checks import check_config, check_dataset_options, parse_ints
from .config import RunConfig, load_yaml, resolve
from .errors import ConfigError, UnknownNameError, nearest
from .registry import DATASETS, METHODS

EXPERIMENT_KEYS = ("base", "name", "description", "methods", "datasets", "shots", "seeds", "backbone",
                   "data_root", "dataset_options", "config", "methods_config", "table", "variants",
                   "caption", "curve", "launcher")
EXPERIMENTS_DIR = ROOT / "configs" / "experiments"
METHOD_SETS = ROOT / "configs" / "method_sets.yaml"
DEFAULT_EXPERIMENT = "embedded"


def known_experiments() -> List[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def load_experiment(name_or_path: str) -> Dict[str, Any]:
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.exists()):
        p = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            raise UnknownNameError("experiment", name_or_path, known_experiments())
    exp = load_yaml(p)
    for key in exp:
        if key not in EXPERIMENT_KEYS:
            raise ConfigError(f"{p}: unknown experiment key {key!r}; did you mean "
                              f"{nearest(str(key), EXPERIMENT_KEYS)!r}? Valid keys: {', '.join(EXPERIMENT_KEYS)}.")
    if exp.get("base"):
        base = load_experiment(exp.pop("base"))
        base.update(exp)
        exp = base
        exp["name"] = load_yaml(p).get("name", p.stem)
    exp.setdefault("name", p.stem)
    exp["_path"] = str(p)
    side = p.with_suffix(".d")
    if side.is_dir():
        mc = exp.setdefault("methods_config", {}) or {}
        exp["methods_config"] = mc
        for f in sorted(side.glob("*.yaml")):
            if f.stem in mc:
                raise ConfigError(f"method {f.stem!r} is configured both in {p} (methods_config) and in {f}")
            mc[f.stem] = load_yaml(f)
    return expand_curve(exp, p)


def expand_curve(exp: Dict[str, Any], where="experiment") -> Dict[str, Any]:
    """``curve: {key: train.epochs, values: [1, 2, 4, 8], label: ...}`` turns each method of
    ``methods`` into one variant per value, labelled ``<method>@<value>`` with ``key`` set to the
    value (a budget curve, a sensitivity curve); ``_curve_points`` maps each label to
    (method, value) for the report (:func:`benchmark.report.write_curve`)."""
    curve = exp.get("curve")
    if not curve:
        return exp
    if not isinstance(curve, dict) or set(curve) - {"key", "values", "label"} or not curve.get("key") \
            or not isinstance(curve.get("values"), list) or not curve["values"]:
        raise ConfigError(f"{where}: curve must be {{key: <dotted config key>, values: [v1, v2, ...], "
                          f"label: <axis title>}}, got {curve!r}")
    section = str(curve["key"]).split(".")[0]
    if "." not in str(curve["key"]) or section not in ("params", "train", "ssl", "eval", "data"):
        raise ConfigError(f"{where}: curve.key must be a dotted config key such as train.epochs, "
                          f"got {curve['key']!r}")
    variants = exp.setdefault("variants", {}) or {}
    exp["variants"] = variants
    labels, points = [], {}
    for m in expand_methods(exp.get("methods")):
        base = variants.get(m, {"method": m, "config": {}})
        for v in curve["values"]:
            label = f"{m}@{v}"
            tree = copy.deepcopy(base.get("config") or {})
            node = tree
            parts = str(curve["key"]).split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = v
            variants[label] = {"method": base["method"], "config": tree}
            labels.append(label)
            points[label] = (m, v)
    exp["methods"] = labels
    exp["_curve_points"] = points
    return exp


def _as_list(v, kind: str) -> List:
    if v is None:
        raise ConfigError(f"the experiment lists no {kind}")
    if isinstance(v, (str, int)):
        v = [x.strip() for x in str(v).split(",") if x.strip()]
    return list(v)


def method_sets() -> Dict[str, List[str]]:
    """Named method lists (``configs/method_sets.yaml``)."""
    sets = load_yaml(METHOD_SETS) if METHOD_SETS.exists() else {}
    for name, members in sets.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{METHOD_SETS}: set {name!r} must be a list of method names, got {members!r}")
    return sets


def expand_methods(spec) -> List[str]:
    """An experiment's ``methods`` value as a list of names: set names (``paper``) are replaced by
    their members, ``all`` by every registered method; duplicates keep their first place."""
    sets = method_sets()
    out: List[str] = []
    for name in _as_list(spec, "methods"):
        members = METHODS.names() if name == "all" else sets.get(name, [name])
        out += [m for m in members if m not in out]
    return out


@dataclass
class Grid:
    experiment: Dict[str, Any]
    methods: List[str]
    datasets: List[str]
    shots: List[int]
    seeds: List[int]
    runs: List[RunConfig] = field(default_factory=list)


def build_grid(exp: Dict[str, Any], methods: Optional[List[str]] = None,
               datasets: Optional[List[str]] = None, shots: Optional[List[int]] = None,
               seeds: Optional[List[int]] = None, sets: Optional[List[str]] = None,
               data_root: Optional[str] = None, device: Optional[str] = None) -> Grid:
    exp = copy.deepcopy(exp)
    m = expand_methods(methods or exp.get("methods"))
    d = _as_list(datasets or exp.get("datasets"), "datasets")
    k = parse_ints(_as_list(shots or exp.get("shots"), "shots"), "shots")  # checked: whole, >= 1
    s = parse_ints(_as_list(seeds or exp.get("seeds"), "seeds"), "seeds")
    variants = exp.get("variants") or {}
    for label, v in variants.items():
        if not isinstance(v, dict) or "method" not in v or set(v) - {"method", "config"}:
            raise ConfigError(f"variant {label!r}: expected {{method: <name>, config: {{...}}}}, got {v!r}")
    for name in m:
        if name not in variants:
            try:
                METHODS.get(name)  # unknown names fail here, with the closest match
            except UnknownNameError:
                raise UnknownNameError("method", name, list(METHODS.names()) + list(variants)) from None
    for name in d:
        DATASETS.get(name)
    root = data_root or exp.get("data_root")
    cli = list(sets or [])
    grid = Grid(exp, m, d, k, s)
    for ds in d:
        ds_exp = copy.deepcopy(exp)
        cfg_tree = ds_exp.setdefault("config", {}) or {}
        ds_exp["config"] = cfg_tree
        data = cfg_tree.setdefault("data", {})
        if root:
            data["root"] = str(root)
        opts = (exp.get("dataset_options") or {}).get(ds)
        if opts:
            data["options"] = opts
        for shot in k:
            for seed in s:
                for name in m:
                    extra = cli + ([f"device={device}"] if device else [])
                    v = variants.get(name)
                    if v:
                        grid.runs.append(resolve(METHODS.get(v["method"]), ds, shot, seed, ds_exp, extra,
                                                 label=name, variant_config=v.get("config")))
                    else:
                        grid.runs.append(resolve(METHODS.get(name), ds, shot, seed, ds_exp, extra))
    for run in grid.runs:  # every declared range, before anything runs
        check_config(run)
    check_dataset_options(grid.runs)
    return grid
