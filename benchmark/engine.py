"""The engine: one run = (method, dataset, shots, seed) under a resolved :class:`RunConfig`.

It owns seeding, the optimiser and schedule, AMP, the optional FixMatch-style unlabeled loop,
atomic checkpoints with automatic resume, evaluation, metrics and the run's files::

    <results>/runs/<dataset>/<method>/shots<k>_seed<s>/
        result.json       metrics, resolved config + hash, split hash, cost, environment
        predictions.npz   per-sample logits and known-scores (metrics can be recomputed)
        learned.pt        the method's learned state (trained methods)
        checkpoint.pt     only while a run is unfinished
        log.jsonl         training log
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import ROOT, __version__
from .backbone import BackboneConfig, CLIPBackbone, ImageOutput
from .config import RunConfig, cell_hash, config_hash, to_dict
from .errors import BenchmarkError, ConfigError, ResultExistsError, RunLockedError
from .checks import check_config
from .integrity import heal_run, inspect_run, load_checkpoint, read_run, trim_log
from .io import atomic_savez, atomic_torch_save, atomic_write_json
from .loader import (EvalImageMemo, FeatureCache, StepBatches, ViewBatch, ViewFeatureCache, build_transforms, encode_augmented,
                     eval_loader, stream_loader, with_loader_workers)
from .method import Batch, LabeledSet, Method, MethodContext, Prediction, StepState, UnlabeledPool
from .metrics import compute_all
from .protocol import OSSLSplit, load_or_create
from .registry import DATASETS, METHODS
from .ssl import fixmatch_loss

CRASH_ENV = "OSSL_CRASH_AFTER_STEP"  # test hook: hard-exit after this step (simulates a kill)


def run_dir(results_dir: Path, cfg: RunConfig) -> Path:
    tail = "" if cfg.eval.split == "test" else f"_{cfg.eval.split}"  # validation runs sit beside
    return Path(results_dir) / "runs" / cfg.dataset / cfg.label / f"shots{cfg.shots}_seed{cfg.seed}{tail}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return dev


def autocast_for(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    if amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"train.amp must be auto, bf16 or off, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def lr_at(step: int, total: int, spe: int, tc) -> float:
    """Learning rate of step ``step``: Dassl's constant warm-up then cosine (or constant).

    Dassl's counting (``build_lr_scheduler`` with its default ``WARMUP_RECOUNT=True``): a
    ``CosineAnnealingLR(T_max=max_epoch)`` wrapped in ``ConstantWarmupScheduler(warmup_epoch W,
    cons_lr)``, stepped once after every epoch. The wrapper hands over to the cosine only after
    its W warm-up epochs, and the cosine's own count starts then, so epoch ``e`` (0-based) gets
    ``warmup_lr`` for ``e < W`` and ``lr_min + (lr - lr_min)(1 + cos(pi (e - W) / max_epoch)) / 2``
    after: the first epoch after warm-up runs at the full lr, and with W > 0 the last epoch stays
    above ``lr_min`` (T_max is max_epoch, not max_epoch - W). With ``schedule_unit: iteration`` the
    same holds per step (CLIP-LoRA: no warm-up, cosine over the iterations). Tested epoch by epoch
    against PyTorch's own schedulers wrapped as Dassl does. A change to what this returns bumps
    :data:`benchmark.config.SCHEDULE_REVISION` (the config hash of the runs it changes)."""
    if tc.schedule_unit == "epoch":
        t, T, warm = step // spe, max(1, math.ceil(total / spe)), tc.warmup_epochs
    elif tc.schedule_unit == "iteration":
        t, T, warm = step, total, tc.warmup_epochs * spe
    else:
        raise ConfigError(f"train.schedule_unit must be epoch or iteration, got {tc.schedule_unit!r}")
    if t < warm:
        return tc.warmup_lr
    if tc.scheduler == "constant":
        return tc.lr
    if tc.scheduler != "cosine":
        raise ConfigError(f"train.scheduler must be cosine or constant, got {tc.scheduler!r}")
    return tc.lr_min + 0.5 * (tc.lr - tc.lr_min) * (1 + math.cos(math.pi * (t - warm) / T))


def make_optimizer(groups: List[dict], tc) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    raise ConfigError(f"train.optimizer must be sgd or adamw, got {tc.optimizer!r}")


def environment(device: torch.device) -> Dict[str, str]:
    import open_clip

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "open_clip": open_clip.__version__, "platform": platform.platform(),
           "device": str(device), "suite": __version__,
           # float sums of a CPU run depend on the thread count (reduction order): a seed reproduces
           # a run exactly for the same count
           "torch_threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        pass
    return env


class RunLock:
    """A lock file holding ``pid@host``, so two processes never run the same run, even from two
    machines sharing the results folder (a cluster's job array). A lock of a dead process on this
    host is taken over at once; one from another host, whose pid cannot be checked from here, once
    its heartbeat (the holder touches the file every ``HEARTBEAT_S``) is older than ``STALE_S``."""

    HEARTBEAT_S = 30.0
    STALE_S = 300.0  # our default: ten missed heartbeats (a killed job's lock, e.g. after a node failure)

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._stop = None

    @staticmethod
    def me() -> str:
        return f"{os.getpid()}@{socket.gethostname()}"

    @classmethod
    def holder(cls, folder: Path) -> Optional[str]:
        """``pid@host`` of the live process holding this run's lock, or None."""
        path = Path(folder) / ".lock"
        try:
            text = path.read_text().strip()
            age = time.time() - path.stat().st_mtime
        except OSError:
            return None
        pid_s, _, host = text.partition("@")
        try:
            pid = int(pid_s or "0")
        except ValueError:
            pid = 0
        if not pid:
            return None
        if not host or host == socket.gethostname():  # a bare pid: written on this host
            return f"{pid}@{host or socket.gethostname()}" if _alive(pid) else None
        return text if age < cls.STALE_S else None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, self.me().encode())
                os.close(fd)
                self._start_heartbeat()
                return self
            except FileExistsError:
                who = self.holder(self.path.parent)
                if who and who != self.me():
                    raise RunLockedError(self.path.parent, who)
                self.path.unlink(missing_ok=True)
        raise BenchmarkError(f"could not lock {self.path}")

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()

        def beat(stop=self._stop, path=self.path):
            while not stop.wait(self.HEARTBEAT_S):
                try:
                    os.utime(path)
                except OSError:
                    return

        threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True).start()

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Engine:
    def __init__(self, results_dir: Path | str = ROOT / "results", force: bool = False,
                 log: Callable[[str], None] = print):
        self.results_dir = Path(results_dir)
        self.force = force
        self.log = log
        self._backbones: Dict[tuple, CLIPBackbone] = {}
        self._datasets: Dict[tuple, object] = {}
        self.features = FeatureCache(self.results_dir / "cache" / "features")
        self.view_features = ViewFeatureCache(self.results_dir / "cache" / "views")  # data.cached_views
        self.eval_memo: Optional[EvalImageMemo] = None  # eval.memo_mb: evaluation images in memory

    # -- shared resources ---------------------------------------------------------------------
    def backbone(self, bcfg: BackboneConfig, device: torch.device) -> CLIPBackbone:
        key = (bcfg.model, bcfg.pretrained, bcfg.cache_dir, str(device))
        if key not in self._backbones:
            self._backbones[key] = CLIPBackbone.load(bcfg, device=device)
        return self._backbones[key]

    def backbone_for(self, method_cls, bcfg: BackboneConfig, device: torch.device) -> CLIPBackbone:
        """The backbone a method gets: the shared one, or a private deep copy for methods that edit
        its modules (``modifies_backbone``). Always uncompiled: a compiled block's deep copy would
        call the original block's code; ``set_compiled(train.compile)`` goes after the method is built."""
        backbone = self.backbone(bcfg, device)
        backbone.set_compiled(False)
        return copy.deepcopy(backbone) if method_cls.modifies_backbone else backbone

    def dataset(self, name: str, cfg: RunConfig):
        key = (name, cfg.data.root, json.dumps(cfg.data.options, sort_keys=True))
        if key not in self._datasets:
            cls = DATASETS.get(name)
            if cls.needs_root and not cfg.data.root:
                raise ConfigError(f"dataset {name!r} needs a data root: pass --data-root DIR "
                                  f"(or data.root in the experiment YAML)")
            self._datasets[key] = cls(root=cfg.data.root, **cfg.data.options)
        return self._datasets[key]

    # -- status -------------------------------------------------------------------------------
    def status(self, cfg: RunConfig) -> str:
        """complete | stale (finished with another config hash) | partial | failed | missing |
        damaged (a file of the run is truncated or corrupt: :meth:`damaged` says which)"""
        return self.status_and_damage(cfg)[0]

    def status_and_damage(self, cfg: RunConfig) -> Tuple[str, List[Tuple[Path, str]]]:
        """:meth:`status` and the run's damaged files and why (:func:`inspect_run`), from one
        check of its files."""
        d = run_dir(self.results_dir, cfg)
        result, problems = read_run(d)
        if problems:
            return "damaged", problems
        if result is not None:
            return ("complete" if result.get("config_hash") == config_hash(cfg) else "stale"), problems
        if (d / "checkpoint.pt").exists():
            return "partial", problems
        if (d / "error.txt").exists():
            return "failed", problems
        return "missing", problems

    def damaged(self, cfg: RunConfig) -> List[Tuple[Path, str]]:
        """The run's damaged files and why (its split manifest included)."""
        from .protocol import manifest_problem
        out = inspect_run(run_dir(self.results_dir, cfg))
        why = manifest_problem(self.results_dir, cfg.dataset, cfg.shots, cfg.seed, cfg.eval.split)
        return out + ([why] if why else [])

    # -- one run ------------------------------------------------------------------------------
    def run(self, cfg: RunConfig) -> dict:
        d = run_dir(self.results_dir, cfg)
        chash = config_hash(cfg)
        res_path = d / "result.json"
        check_config(cfg)
        with RunLock(d):
            old, _ = heal_run(d, self._archive, self.log)  # damaged files: quarantined, the run redone
            if old is not None:
                if old.get("config_hash") == chash:
                    return old
                if not self.force:
                    raise ResultExistsError(
                        f"{res_path} holds a finished run with config hash {old.get('config_hash')} but "
                        f"the requested config hashes to {chash}. Pass --force to rerun (the old result "
                        f"is archived, not overwritten), or use another --results-dir.")
                self.preflight(cfg)  # a --force with a bad new config must not archive the result
                self._archive(d)
            try:
                result = self._run(cfg, d, chash)
            except BaseException as exc:
                if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    (d / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
                raise
        (d / "error.txt").unlink(missing_ok=True)
        return result

    def preflight(self, cfg: RunConfig) -> None:
        """Build everything a run needs (dataset and its split, backbone, method) without training
        or writing results: a bad config fails here, before ``--force`` archives anything (``run``
        has already checked the config's ranges)."""
        device = resolve_device(cfg.device)
        autocast_for(device, cfg.train.amp)
        rng = _get_rng()  # building seeds the generators: leave them as they were
        try:
            self._build(cfg, device)
        finally:
            _set_rng(rng)

    def _build(self, cfg: RunConfig, device: torch.device) -> Tuple[OSSLSplit, CLIPBackbone, Method]:
        """The run's split, backbone and method (seeded, on ``device``), for :meth:`preflight` and
        :meth:`_run` alike."""
        method_cls = METHODS.get(cfg.method)
        plugin = self.dataset(cfg.dataset, cfg)
        split = load_or_create(plugin, cfg.shots, cfg.seed, self.results_dir, cfg.eval.split)
        backbone = self.backbone_for(method_cls, cfg.backbone, device)
        for bb in {id(backbone): backbone, 0: self.backbone(cfg.backbone, device)}.values():
            bb.short_text = cfg.train.short_text  # before the method: some encode text at build
            bb.sdpa_blocks = cfg.train.sdpa_blocks  # the shared one too: it encodes cached features
        ctx = MethodContext(classnames=split.id_classnames, template=plugin.template,
                            dataset=cfg.dataset, shots=cfg.shots, seed=cfg.seed)
        seed_everything(cfg.seed)
        return split, backbone, method_cls(cfg.params, backbone, ctx).to(device)

    def _archive(self, d: Path) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        arch, n = d / "archive" / stamp, 1
        while arch.exists():  # two archivings within one second must not overwrite each other
            n += 1
            arch = d / "archive" / f"{stamp}-{n}"
        arch.mkdir(parents=True, exist_ok=True)
        for name in ("result.json", "predictions.npz", "learned.pt", "checkpoint.pt", "log.jsonl"):
            if (d / name).exists():
                os.replace(d / name, arch / name)
        self.log(f"archived the previous result to {arch}")

    def _run(self, cfg: RunConfig, d: Path, chash: str) -> dict:
        t0 = time.time()
        device = resolve_device(cfg.device)
        autocast = autocast_for(device, cfg.train.amp)
        cfg = with_loader_workers(cfg, device)  # data.num_workers: null -> what the machine has
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        split, backbone, method = self._build(cfg, device)
        backbone.set_compiled(cfg.train.compile)  # after the method: LoRA edits the blocks first
        views = build_transforms(backbone.preprocess_cfg, cfg.data)
        self._setup(cfg, method, split, views, device, autocast)
        n_trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
        train_info = {"steps": 0, "resumed_from_step": None, "train_seconds": 0.0}
        if method.trains:
            if n_trainable == 0:
                raise BenchmarkError(f"method {cfg.method!r} trains but has no trainable parameters "
                                     f"(a training-free method sets trains = False)")
            train_info = self._train(cfg, d, chash, method, split, views, device, autocast)
        else:  # training-free: no optimiser, no loop, no checkpoint; learned buffers are still saved
            method.eval()
            method.after_train()
            learned = method.learned_state_dict()
            if learned:
                atomic_torch_save(d / "learned.pt", learned)
        t_eval = time.time()
        preds = self._predict_all(cfg, method, backbone, split, views, device, autocast)
        metrics, by_score, primary = self._metrics(cfg, preds, split.K)
        eval_s = time.time() - t_eval
        atomic_savez(d / "predictions.npz", **preds)
        self._save_patch_selection(cfg, method, backbone, split, views, device, autocast, d)
        result = {
            "status": "complete",
            "method": cfg.method, "label": cfg.label, "dataset": cfg.dataset, "shots": cfg.shots, "seed": cfg.seed,
            "metrics": metrics,
            "known_score": primary,
            "metrics_by_score": by_score,
            "config_hash": chash,
            "cell_hash": cell_hash(cfg),
            "split_hash": split.hash,
            "backbone_identity": backbone.identity,
            "num_known": split.K,
            "cost": {
                "total_seconds": round(time.time() - t0, 3),
                "train_seconds": round(train_info["train_seconds"], 3),
                "eval_seconds": round(eval_s, 3),
                "steps": train_info["steps"],
                "resumed_from_step": train_info["resumed_from_step"],
                "trainable_params": int(n_trainable),
                "peak_rss_mb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                if device.type == "cuda" else None,
            },
            "config": to_dict(cfg),
            "environment": environment(device),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(d / "result.json", result)
        (d / "checkpoint.pt").unlink(missing_ok=True)
        return result

    # -- setup --------------------------------------------------------------------------------
    def _setup(self, cfg, method: Method, split: OSSLSplit, views, device, autocast) -> None:
        """Call ``method.setup`` with the labeled set (ids, labels, cached frozen features when asked)
        and, when declared, the unlabeled pool (ids and features, never labels)."""
        shared = self.backbone(cfg.backbone, device)  # the frozen CLIP, never a method's edited copy
        ids = split.train.ids
        feats = None
        if method.setup_features:
            feats = self.features.get(shared, cfg.dataset, split.train, views["test"], cfg.eval.batch_size,
                                      device, autocast, cfg.data.num_workers)

        def augmented(rounds: int) -> torch.Tensor:
            return encode_augmented(shared, split.train, split.labeled_idx, views["weak"], rounds, cfg.seed,
                                    cfg.eval.batch_size, device, autocast, cfg.data.num_workers).to(device)

        labeled = LabeledSet(ids=[ids[i] for i in split.labeled_idx],
                             labels=torch.from_numpy(split.labeled_y).to(device),
                             features=feats[split.labeled_idx].to(device) if feats is not None else None,
                             augmented=augmented)
        pool = None
        if method.setup_unlabeled:
            pool = UnlabeledPool(ids=[ids[i] for i in split.unlabeled_idx],
                                 features=feats[split.unlabeled_idx].to(device) if feats is not None else None)
        with torch.no_grad():
            method.setup(labeled, pool)

    # -- training -----------------------------------------------------------------------------
    def _train(self, cfg, d, chash, method, split: OSSLSplit, views, device, autocast) -> dict:
        tc, sc = cfg.train, cfg.ssl
        generic_ssl = sc.enabled and not method.uses_unlabeled
        want_u = method.uses_unlabeled or generic_ssl
        n_l, n_u = len(split.labeled_idx), len(split.unlabeled_idx)  # the budget: the whole labeled set
        lab_idx = labeled_train_idx(cfg, method, split)  # the images that fill the labeled batches
        if tc.epoch_over == "labeled":
            spe = StepBatches.steps_per_epoch(n_l, tc.batch_size)
        elif tc.epoch_over == "unlabeled":
            spe = StepBatches.steps_per_epoch(n_u, sc.unlabeled_batch_size)
        else:
            raise ConfigError(f"train.epoch_over must be labeled or unlabeled, got {tc.epoch_over!r}")
        if tc.iterations:
            total = int(tc.iterations)
        elif tc.iterations_per_shot:
            total = int(tc.iterations_per_shot) * cfg.shots
        else:
            total = int(tc.epochs) * spe
        opt = make_optimizer(method.param_groups(), tc)
        start = 0
        ckpt_path = d / "checkpoint.pt"
        train_seconds = 0.0
        resumed = None
        ck = load_checkpoint(ckpt_path, self.log)  # None: absent, or damaged and quarantined
        if ck is not None:
            if ck.get("config_hash") != chash:
                if not self.force:
                    raise ResultExistsError(
                        f"{ckpt_path} belongs to a run with config hash {ck.get('config_hash')}, not "
                        f"{chash}. Pass --force to discard it and start over.")
                ckpt_path.unlink()
            else:
                method.load_learned_state_dict(ck["learned"])
                opt.load_state_dict(ck["optimizer"])
                _set_rng(ck["rng"])
                start = resumed = int(ck["step"])
                train_seconds = float(ck.get("train_seconds", 0.0))
                self.log(f"  resuming from step {start}/{total}")
        pin = device.type == "cuda"
        # data.cached_views: the frozen weak-view passes served from cached augmented views
        serve_l = self._view_cache(cfg, split, views, device, autocast, lab_idx, tc.batch_size,
                                   "labeled", tuple(method.frozen_train_outputs))
        serve_u = self._view_cache(cfg, split, views, device, autocast, split.unlabeled_idx,
                                   sc.unlabeled_batch_size, "unlabeled",
                                   ("pooled",) if generic_ssl and method.frozen_image_encoder else ())
        lab_views = {v: views[v] for v in method.labeled_views if not (serve_l and v == "weak")}
        bn = cfg.data.batch_normalize
        lab = iter(stream_loader(split.train, lab_idx, lab_views, tc.batch_size, cfg.seed,
                                 "labeled", start, total, cfg.data.num_workers, pin, bn))
        unl = None
        if want_u:
            u_views = {v: views[v] for v in (("weak", "strong") if generic_ssl else method.unlabeled_views)
                       if not (serve_u and v == "weak")}
            unl = iter(stream_loader(split.train, split.unlabeled_idx, u_views, sc.unlabeled_batch_size,
                                     cfg.seed, "unlabeled", start, total, cfg.data.num_workers, pin, bn))
        crash_after = int(os.environ.get(CRASH_ENV, "-1"))
        method.train()
        last_ck_t, last_ck_step = time.time(), start
        trim_log(d / "log.jsonl", start)  # records past the checkpoint were logged before a kill
        logf = open(d / "log.jsonl", "a")
        t_start = time.time()
        try:
            for step in range(start, total):
                lr = lr_at(step, total, spe, tc)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                xb = next(lab)
                batch = self._to_batch(xb, unl, device, split)
                if serve_l:
                    batch.features = {"weak": serve_l(step, batch.ids)}
                state = StepState(step=step, total_steps=total, epoch=step // spe, steps_per_epoch=spe)
                with autocast():
                    out = method.training_step(batch, state)
                    loss = out.loss
                    logs = dict(out.logs)
                    if generic_ssl:
                        with torch.no_grad():
                            if serve_u:
                                lw = method.predict_features(serve_u(step, batch.u_ids).pooled).logits
                            else:
                                lw = method.predict(batch.u["weak"]).logits
                        ls = method.predict(batch.u["strong"]).logits
                        lu, mask = fixmatch_loss(lw.float(), ls.float(), sc.threshold)
                        loss = loss + sc.weight * lu
                        logs.update(loss_u=float(lu.detach()), mask_rate=float(mask.mean()))
                if not torch.isfinite(loss):
                    raise BenchmarkError(f"non-finite loss {float(loss)} at step {step}; lower train.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                   tc.grad_clip)
                opt.step()
                done = step + 1
                if done % max(1, tc.log_every) == 0 or done == total:
                    rec = {"step": done, "total": total, "lr": lr, "loss": float(loss.detach()), **logs}
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                if done < total and (done - last_ck_step >= tc.checkpoint_every
                                     or time.time() - last_ck_t >= tc.checkpoint_every_s):
                    self._checkpoint(ckpt_path, chash, method, opt, done,
                                     train_seconds + time.time() - t_start)
                    last_ck_t, last_ck_step = time.time(), done
                if done == crash_after:
                    logf.flush()
                    os._exit(137)
        finally:
            logf.close()
            self.view_features.flush()
        method.eval()
        method.after_train()
        train_seconds += time.time() - t_start
        atomic_torch_save(d / "learned.pt", method.learned_state_dict())
        return {"steps": total, "resumed_from_step": resumed, "train_seconds": train_seconds}

    def _view_cache(self, cfg, split: OSSLSplit, views, device, autocast, indices, batch_size: int,
                    stream: str, fields: Tuple[str, ...]):
        """``data.cached_views``: a function ``(step, batch ids) -> ImageOutput`` serving the frozen
        image-tower outputs ``fields`` of the stream's weak views at that step from the shared view
        cache (each sample's view: its loader augmentation seed modulo the number of views), or None
        when the option is off or does not apply (no fields)."""
        n = int(cfg.data.cached_views)
        if n < 0:
            raise ConfigError(f"data.cached_views must be 0 (off) or a number of views, got {n}")
        if n == 0 or not fields:
            return None
        shared = self.backbone(cfg.backbone, device)  # the frozen CLIP these methods read
        cache, train = self.view_features, split.train
        sb = StepBatches(indices, batch_size, cfg.seed, stream, 0, 0)

        def ensure(idx):
            return cache.ensure(shared, cfg.dataset, train, views["weak"], n, fields, idx,
                                cfg.eval.batch_size, device, autocast)

        if stream == "labeled":
            ensure([int(i) for i in indices])  # the whole labeled set once, before the first step

        def serve(step: int, ids) -> ImageOutput:
            pairs = sb.batch(step)
            idx = [i for i, _ in pairs]
            if [train.ids[i] for i in idx] != list(ids):
                raise BenchmarkError(f"data.cached_views: the {stream} batch of step {step} does not match "
                                     f"the loader's (internal error)")
            out = cache.lookup(ensure(idx), list(ids), [s % n for _, s in pairs], fields, device)
            return ImageOutput(**out)

        return serve

    def _to_batch(self, xb, unl, device, split) -> Batch:
        return make_batch(xb, next(unl) if unl is not None else None, split, device)

    def _checkpoint(self, path, chash, method, opt, step, train_seconds) -> None:
        atomic_torch_save(path, {
            "config_hash": chash, "step": step, "train_seconds": train_seconds,
            "learned": method.learned_state_dict(), "optimizer": opt.state_dict(), "rng": _get_rng()})

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _predict_all(self, cfg, method, backbone, split: OSSLSplit, views, device, autocast) -> dict:
        method.eval()
        ec = cfg.eval
        out: Dict[str, np.ndarray] = {}
        for name, s, idx in (("test", split.test, split.test_idx),
                             ("labeled", split.train, split.labeled_idx)):
            preds: List[Prediction] = []
            if method.frozen_image_encoder:
                feats = self.features.get(backbone, cfg.dataset, s, views["test"], ec.batch_size,
                                          device, autocast, cfg.data.num_workers)[idx]
                for i in range(0, len(feats), ec.batch_size):
                    with autocast():
                        preds.append(method.predict_features(feats[i:i + ec.batch_size].to(device)))
            else:
                for x in self._eval_images(cfg, name, s, idx, views["test"], device):
                    with autocast():
                        preds.append(method.predict(x.to(device)))
            logits = torch.cat([p.logits.float().cpu() for p in preds]).numpy()
            if logits.shape[1] != split.K:
                raise BenchmarkError(f"{cfg.method}.predict returned {logits.shape[1]} logits per image; "
                                     f"expected K={split.K} (the known classes only)")
            out[f"{name}_logits"] = logits
            for key in preds[0].scores:
                out[f"{name}_score_{key}"] = torch.cat([p.scores[key].float().cpu() for p in preds]).numpy()
            out[f"{name}_ids"] = np.array([s.ids[i] for i in idx])
        out["test_y_open"] = split.test_y_open[split.test_idx]
        out["labeled_y"] = split.labeled_y
        out["num_known"] = np.array(split.K)
        return out

    def _eval_images(self, cfg, which: str, split, idx, transform, device):
        """Batches of evaluation images ``split[idx]`` through the test transform: from the loader,
        or (``eval.memo_mb`` > 0) through the engine's in-memory memo of them, the same tensors."""
        ec = cfg.eval
        pin = device.type == "cuda"
        bn = cfg.data.batch_normalize
        if not ec.memo_mb:
            return (b["test"] for b in eval_loader(split, idx, transform, ec.batch_size, cfg.data.num_workers,
                                                   pin, bn))
        if self.eval_memo is None or self.eval_memo.budget != ec.memo_mb * 2 ** 20:
            self.eval_memo = EvalImageMemo(ec.memo_mb)
        key = json.dumps([cfg.dataset, cfg.data.root, cfg.data.options, which,
                          ec.split if which == "test" else "train", split.fingerprint(),
                          getattr(split, "variant", ""), repr(transform)], sort_keys=True, default=str)
        return self.eval_memo.batches(key, split, idx, transform, ec.batch_size, cfg.data.num_workers, pin, bn)

    @torch.no_grad()
    def _save_patch_selection(self, cfg, method, backbone, split, views, device, autocast, d) -> None:
        n = min(cfg.eval.explain_images, len(split.test_idx))
        if n <= 0 or type(method).patch_selection is Method.patch_selection:
            return
        # the first n ID test images, one per class where possible
        K = split.K
        idx = [int(i) for i in split.test_idx if split.test_y_open[i] < K]
        by_class = {}
        for i in idx:
            by_class.setdefault(int(split.test.labels[i]), i)
        chosen = (list(by_class.values()) + idx)[:n]
        chosen = list(dict.fromkeys(chosen))[:n]
        images = torch.stack([views["test"](split.test.image(i)) for i in chosen]).to(device)
        with autocast():
            maps = method.patch_selection(images)
        if not maps:
            return
        size = images.shape[-1]
        raw = np.stack([np.asarray(split.test.image(i).convert("RGB").resize((size, size))) for i in chosen])
        gh, gw = backbone.grid_size
        atomic_savez(d / "patches.npz", images=raw, ids=np.array([split.test.ids[i] for i in chosen]),
                     labels=np.array([split.id_classnames[split.test.labels[i]] for i in chosen]),
                     grid=np.array([gh, gw]), **{f"mask_{k}": v.cpu().numpy() for k, v in maps.items()})

    def _metrics(self, cfg, preds: dict, K: int):
        return metrics_from_predictions(preds, K, cfg.eval.known_score, cfg.eval.id_recall)


def labeled_train_idx(cfg: RunConfig, method: Method, split: OSSLSplit) -> np.ndarray:
    """Positions in ``split.train`` of the labeled images the training stream draws from: the
    labeled set, or the rows of it that the method names (:meth:`Method.labeled_train_rows`). The
    run's length stays counted on the whole labeled set (the budget rule: the same steps and
    labeled images per step as every method); the stream passes over these rows epoch after epoch."""
    rows = method.labeled_train_rows()
    if rows is None:
        return split.labeled_idx
    rows = torch.as_tensor(rows).cpu().numpy()
    n = len(split.labeled_idx)
    if rows.ndim != 1 or not len(rows) or rows.dtype.kind not in "iu" or len(np.unique(rows)) != len(rows) \
            or rows.min() < 0 or rows.max() >= n:
        raise BenchmarkError(f"{cfg.method}.labeled_train_rows() must give distinct integer rows of the "
                             f"labeled set in [0, {n}), at least one; got {rows.tolist()}")
    return split.labeled_idx[rows]


def make_batch(lab: ViewBatch, unl: Optional[ViewBatch], split: OSSLSplit, device) -> Batch:
    """A method's :class:`Batch` from the labeled (and unlabeled) loader batches: images on
    ``device``, sample ids of both streams, labels for the labeled images only (the true labels of
    unlabeled images never reach a method)."""
    ids = split.train.ids
    idx = lab.index.tolist()
    batch = Batch(x={k: v.to(device, non_blocking=True) for k, v in lab.views.items()},
                  y=torch.from_numpy(split.train.labels[idx]).to(device),
                  ids=[ids[i] for i in idx])
    if unl is not None:
        batch.u = {k: v.to(device, non_blocking=True) for k, v in unl.views.items()}
        batch.u_ids = [ids[i] for i in unl.index.tolist()]
    return batch


def metrics_from_predictions(preds, K: int, known_score: str = "auto", id_recall: float = 0.95):
    """Recompute every metric from a saved ``predictions.npz`` (or the dict the engine builds)."""
    names = [k[len("test_score_"):] for k in preds.keys() if k.startswith("test_score_")]
    if not names:
        raise BenchmarkError("the method returned no known-scores; predict() must return at least one")
    primary = names[0] if known_score == "auto" else known_score
    if primary not in names:
        raise ConfigError(f"eval.known_score={known_score!r} is not a score of this method; it has "
                          f"{', '.join(names)}")
    by_score = {}
    for n in names:
        by_score[n] = compute_all(preds["test_logits"], preds["test_y_open"], K,
                                  preds[f"test_score_{n}"], preds[f"labeled_score_{n}"], id_recall)
    return by_score[primary], by_score, primary


def _get_rng() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
