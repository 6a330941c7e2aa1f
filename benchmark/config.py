"""Typed, strict configuration.

A run's configuration is a tree of dataclasses (:class:`RunConfig`); a method's own parameters are
its ``Config`` dataclass under ``params``. Values are merged in this order, later winning:

1. dataclass defaults;
2. the method's YAML ``configs/methods/<method>.yaml`` (keys ``params``, ``train``, ``ssl``,
   ``eval``, ``data``) and its ``by_dataset: {<dataset>: {...}}`` and ``by_shots: {<k>: {...}}``
   sections;
3. the experiment YAML's ``config:`` (every method) and ``methods_config: {<method>: {...}}``
   (which may have its own ``by_dataset``/``by_shots`` sections);
4. command-line ``--set key=value`` (``train.epochs=5``, or scoped to one method:
   ``coop.params.n_ctx=4``), which always wins.

Unknown keys fail with the nearest valid key. The resolved config is hashed (fields marked
``hash=False`` in their metadata, such as the data root or the number of loader workers, do not
change results and are left out of the hash).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from . import ROOT
from .data import sha256_json
from .errors import ConfigError, nearest

NOHASH = {"hash": False}
# The revision of the engine's learning-rate schedule (benchmark.engine.lr_at), hashed only into the
# configs whose learning rates it changed: a cosine after warmup_epochs > 0. Revision 2: the cosine
# starts its count after the warm-up (Dassl's WARMUP_RECOUNT); revision 1 counted it from step 0.
# Runs of revision 1 with a warm-up are therefore stale; runs without one keep their hashes.
SCHEDULE_REVISION = 2


@dataclass
class TrainConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    batch_size: int = 32
    epochs: int = 10
    # a fixed number of optimisation steps (wins over epochs when set)
    iterations: Optional[int] = None
    # steps = iterations_per_shot x shots (CLIP-LoRA's 500 x shots); wins over epochs when set
    iterations_per_shot: Optional[int] = None
    # what one epoch passes over: "labeled" (supervised recipes) or "unlabeled" (SSL recipes)
    epoch_over: str = "labeled"
    scheduler: str = "cosine"  # cosine | constant
    lr_min: float = 0.0
    # Dassl steps the schedule once per epoch; CLIP-LoRA once per iteration
    schedule_unit: str = "epoch"  # epoch | iteration
    # Dassl: warm-up epochs at the constant warmup_lr; the cosine (T = all epochs) starts counting
    # after them (ConstantWarmupScheduler, WARMUP_RECOUNT=True; see engine.lr_at)
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    grad_clip: Optional[float] = None
    amp: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | off
    # torch.compile the backbone's residual blocks (a speed option; results agree to float rounding)
    compile: bool = field(default=False, metadata=NOHASH)
    # [default] run the text tower only up to the last EOT position of each batch of prompts (a
    # speed option: the causal mask keeps the EOT features equal up to float rounding); false runs
    # all context positions as open_clip's encode_text does (bit-identical to it). Not hashed, except
    # for methods with random draws in the text tower (Method.random_text_tower: CLIP-LoRA's dropout)
    short_text: bool = field(default=True, metadata=NOHASH)
    # [default] compute open_clip's plain residual blocks with one packed q/k/v projection and
    # F.scaled_dot_product_attention on the batch-first tokens (a speed option: the same function,
    # equal up to float rounding; see CLIPBackbone.sdpa_blocks); false calls each block's own
    # forward through nn.MultiheadAttention (bit-identical to open_clip). On, a pooled-only image
    # pass also runs its last block for the CLS query alone. Not hashed
    sdpa_blocks: bool = field(default=True, metadata=NOHASH)
    checkpoint_every: int = field(default=100, metadata=NOHASH)  # steps between checkpoints
    checkpoint_every_s: float = field(default=60.0, metadata=NOHASH)  # or seconds, whichever first
    log_every: int = field(default=25, metadata=NOHASH)


@dataclass
class SSLConfig:
    """The engine's generic FixMatch-style use of the unlabeled pool, for any method."""

    enabled: bool = False
    weight: float = 1.0  # lambda_u
    threshold: float = 0.95  # confidence mask on the weak view's max probability
    # unlabeled images per step (for the generic loop and for methods that use unlabeled data)
    unlabeled_batch_size: int = 32


@dataclass
class EvalConfig:
    batch_size: int = field(default=256, metadata=NOHASH)
    # which of the method's known-scores drives ba_open, auroc, fpr95 and h_score
    # ("auto": the first score the method returns)
    known_score: str = "auto"
    # ba_open: the threshold keeps this fraction of *labeled* ID images as known
    id_recall: float = 0.95
    # the held-out split the run is evaluated on: "test" (every table) or "val" (a validation
    # split disjoint from train and test, for tuning presets; the embedded datasets serve one)
    split: str = "test"
    # test images whose selected patches are saved (methods with patch_selection) for the figure
    explain_images: int = field(default=6, metadata=NOHASH)
    # [default] evaluation images (the test transform, which draws nothing at random) of methods that
    # run the image tower at evaluation are kept in memory after their first use, up to this many MB
    # per process, and served to the next run on the same dataset bit for bit (a speed option); 0 = off:
    # every run loads and transforms its evaluation images again. Not hashed
    memo_mb: int = field(default=2048, metadata=NOHASH)


@dataclass
class DataConfig:
    root: Optional[str] = field(default=None, metadata=NOHASH)
    options: Dict[str, Any] = field(default_factory=dict)  # passed to the dataset plugin
    crop_scale: Tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale of the train views
    randaugment_n: int = 2  # strong view: RandAugment(n, m)
    randaugment_m: int = 10
    # loader worker processes; null [default]: 0 on CPU, min(8, CPUs this process may use) on CUDA
    num_workers: Optional[int] = field(default=None, metadata=NOHASH)
    # [default] 0 = off. N > 0: methods whose training step reads only the frozen image tower
    # (Method.frozen_train_outputs: CoOp, LoCoOp, CLIP-Adapter's augmented mode, Tip-Adapter-F; and the generic SSL
    # loop's no-grad weak pass for frozen-encoder methods) train on N fixed augmented views per image,
    # encoded once and shared by every method and seed of a grid, instead of a fresh augmentation at
    # every step: faster, but a different augmentation stream from the official recipes
    cached_views: int = 0
    # [default] a view's ToTensor + Normalize (the last two steps of every transform the suite builds)
    # run once per batch in the loader's collation instead of once per image (a speed option: the
    # same element-wise float operations, so the same numbers bit for bit); false: per image. Not hashed
    batch_normalize: bool = field(default=True, metadata=NOHASH)


@dataclass
class BackboneConfig:
    """Which CLIP (the schema only: benchmark.backbone loads it; this module never imports open_clip)."""

    # open_clip model name, e.g. "ViT-B-16" (or "ViT-B-16-quickgelu" for OpenAI weights)
    model: str = "ossl-tiny-vit"
    # open_clip pretrained tag ("openai", "laion2b_s34b_b88k"), a local checkpoint file, or
    # "embedded" for the suite's own tiny CLIP checkpoint
    pretrained: str = "embedded"
    # where open_clip caches downloaded weights (None: its default)
    cache_dir: Optional[str] = None


@dataclass
class RunConfig:
    method: str
    dataset: str
    shots: int
    seed: int
    params: Any  # the method's Config dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    device: str = field(default="auto", metadata=NOHASH)  # auto | cpu | cuda | cuda:N
    # the row name in tables and the run folder: the method's name, or an experiment variant's
    label: str = field(default="", metadata=NOHASH)

    def __post_init__(self):
        self.label = self.label or self.method


SECTIONS = ("params", "train", "ssl", "eval", "data", "backbone")


# ---------------------------------------------------------------------------------------------
def to_dict(obj) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def hashable_dict(obj) -> Any:
    """Like :func:`to_dict` but without fields whose metadata says ``hash=False``."""
    if is_dataclass(obj):
        return {f.name: hashable_dict(getattr(obj, f.name)) for f in fields(obj)
                if f.metadata.get("hash", True)}
    return to_dict(obj)


def _hash_tree(cfg: RunConfig) -> Dict[str, Any]:
    from .registry import METHODS

    d = hashable_dict(cfg)
    if d["eval"].get("split") == "test":
        d["eval"].pop("split")  # the default split leaves the hashes of runs made before it existed
    if getattr(METHODS.get(cfg.method), "random_text_tower", False):
        d["train"]["short_text"] = cfg.train.short_text  # it changes the random draws (see Method)
    # training settings cannot change a run of a class that never trains (a property that decides per
    # instance keeps them in the hash: a needless rerun at worst, never a stale result)
    if getattr(METHODS.get(cfg.method), "trains", True) is False:
        d.pop("train")
        d.pop("ssl")
    elif cfg.train.warmup_epochs > 0 and cfg.train.scheduler == "cosine":
        d["train"]["schedule_revision"] = SCHEDULE_REVISION  # see SCHEDULE_REVISION
    return d


def config_hash(cfg: RunConfig) -> str:
    return sha256_json(_hash_tree(cfg))[:16]


def cell_hash(cfg: RunConfig) -> str:
    """Hash of everything but the seed: the runs averaged in one table cell must share it."""
    d = _hash_tree(cfg)
    d.pop("seed")
    return sha256_json(d)[:16]


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, path) for v, a in zip(value, args))
        return tuple(_coerce(v, args[0], path) for v in value) if args else tuple(value)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], path) for v in value] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def apply_overrides(obj, values: Dict[str, Any], path: str = "") -> None:
    """Set ``values`` (a nested mapping) on the dataclass ``obj``, strictly."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, val in values.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            near = nearest(str(key), names)
            raise ConfigError(
                f"unknown config key {full!r}" + (f"; did you mean {(path + '.' if path else '') + near!r}?" if near else "")
                + f" Valid keys here: {', '.join(sorted(names))}.")
        cur = getattr(obj, key)
        if is_dataclass(cur):
            apply_overrides(cur, val, full)
        else:
            setattr(obj, key, _coerce(val, hints.get(key, Any), full))


def set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_set(expr: str) -> Tuple[str, Any]:
    if "=" not in expr:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=5), got {expr!r}")
    key, raw = expr.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans; keep the word (train.amp=off)
    return key.strip(), value


def load_yaml(path: Path) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def method_yaml(method: str) -> Dict[str, Any]:
    path = ROOT / "configs" / "methods" / f"{method}.yaml"
    return load_yaml(path) if path.exists() else {}


def _check_sections(tree: Dict[str, Any], where: str, extra: Tuple[str, ...] = ()) -> None:
    for key in tree:
        if key not in SECTIONS and key not in extra:
            near = nearest(str(key), SECTIONS + extra)
            raise ConfigError(f"{where}: unknown section {key!r}; did you mean {near!r}? "
                              f"Valid sections: {', '.join(SECTIONS + extra)}.")


def resolve(method_cls, dataset: str, shots: int, seed: int,
            experiment: Optional[Dict[str, Any]] = None,
            cli_sets: Optional[List[str]] = None, label: Optional[str] = None,
            variant_config: Optional[Dict[str, Any]] = None) -> RunConfig:
    """Build a run's :class:`RunConfig` from all layers (see module docstring). A variant (an
    experiment's named configuration of a method, e.g. an ablation row) adds its ``config`` after
    the experiment's layers and before the command line."""
    method = method_cls.name
    cfg = RunConfig(method=method, dataset=dataset, shots=int(shots), seed=int(seed),
                    params=method_cls.Config(), label=label or method)
    # 2. method YAML
    myaml = copy.deepcopy(method_yaml(method))
    by_dataset = myaml.pop("by_dataset", {}) or {}
    by_shots = myaml.pop("by_shots", {}) or {}
    where = f"configs/methods/{method}.yaml"
    _check_sections(myaml, where)
    layers: List[Tuple[str, Dict[str, Any]]] = [(where, myaml)]
    if dataset in by_dataset:
        layers.append((f"{where} by_dataset.{dataset}", by_dataset[dataset]))
    for k, v in by_shots.items():
        if int(k) == int(shots):
            layers.append((f"{where} by_shots.{k}", v))
    # 3. experiment
    exp = experiment or {}
    if exp.get("backbone"):
        layers.append(("experiment backbone", {"backbone": exp["backbone"]}))
    if exp.get("config"):
        layers.append(("experiment config", exp["config"]))
    mc = copy.deepcopy((exp.get("methods_config") or {}).get(method) or {})
    if mc:
        mc_by_dataset = mc.pop("by_dataset", {}) or {}
        mc_by_shots = mc.pop("by_shots", {}) or {}
        layers.append((f"experiment methods_config.{method}", mc))
        if dataset in mc_by_dataset:
            layers.append((f"experiment methods_config.{method}.by_dataset.{dataset}", mc_by_dataset[dataset]))
        for k, v in mc_by_shots.items():
            if int(k) == int(shots):
                layers.append((f"experiment methods_config.{method}.by_shots.{k}", v))
    if variant_config:
        layers.append((f"experiment variants.{label}", variant_config))
    # 4. command line
    cli_tree: Dict[str, Any] = {}
    for expr in cli_sets or []:
        key, value = parse_set(expr)
        head = key.split(".", 1)[0]
        if head not in SECTIONS and "." in key and head != method:
            from .registry import METHODS
            if head in METHODS:
                continue  # scoped to another method
        if head == method and "." in key:
            key = key.split(".", 1)[1]
        set_dotted(cli_tree, key, value)
    if cli_tree:
        layers.append(("--set", cli_tree))
    for where, tree in layers:
        _check_sections(tree, where, extra=("device",))
        for section, values in tree.items():
            if section == "device":
                cfg.device = str(values)
                continue
            try:
                apply_overrides(getattr(cfg, section), values or {}, section)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    return cfg
