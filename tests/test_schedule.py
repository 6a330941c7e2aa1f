"""The engine's learning-rate schedule is Dassl's exactly: W constant warm-up epochs at
``warmup_lr``, then ``CosineAnnealingLR(T_max=max_epoch)`` whose count starts after the warm-up
(Dassl's ``ConstantWarmupScheduler`` with ``WARMUP_RECOUNT=True``), the scheduler stepped once
after each epoch. Reference sequences come from PyTorch's own schedulers, run epoch by epoch."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler, SequentialLR

from benchmark.engine import Engine, lr_at, run_dir
from conftest import toy_cfg


class _ConstantWarmup(LRScheduler):
    """Dassl's warm-up wrapper semantics: ``cons_lr`` while ``last_epoch < warmup_epoch``; from
    then on each ``step()`` steps the successor and reports its lr."""

    def __init__(self, opt, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(opt)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr] * len(self.base_lrs)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()


def _run(sched_factory, lr, epochs):
    """The lr each epoch trains with, as a Dassl trainer sees it (scheduler stepped after it)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
    sched = sched_factory(opt)
    seq = []
    for _ in range(epochs):
        seq.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seq


def dassl_sequence(lr, epochs, warmup, warmup_lr):
    def make(opt):
        cos = CosineAnnealingLR(opt, float(epochs))
        return _ConstantWarmup(opt, cos, warmup, warmup_lr) if warmup > 0 else cos
    return _run(make, lr, epochs)


def sequential_sequence(lr, epochs, warmup, warmup_lr):
    """The same schedule from stock PyTorch parts alone: ConstantLR for the warm-up, then a fresh
    CosineAnnealingLR (SequentialLR restarts it at the milestone)."""
    def make(opt):
        return SequentialLR(opt, [ConstantLR(opt, factor=warmup_lr / lr, total_iters=warmup),
                                  CosineAnnealingLR(opt, float(epochs))], milestones=[warmup])
    return _run(make, lr, epochs)


def _tc(lr, warmup, warmup_lr, unit="epoch", lr_min=0.0):
    return SimpleNamespace(lr=lr, warmup_epochs=warmup, warmup_lr=warmup_lr, scheduler="cosine",
                           schedule_unit=unit, lr_min=lr_min)


def _suite_epochs(lr, epochs, warmup, warmup_lr, spe=3):
    """The engine's lr per epoch; every step of an epoch must get the same one."""
    total = epochs * spe
    tc = _tc(lr, warmup, warmup_lr)
    per_step = [lr_at(s, total, spe, tc) for s in range(total)]
    out = []
    for e in range(epochs):
        chunk = per_step[e * spe:(e + 1) * spe]
        assert len(set(chunk)) == 1, f"lr changes inside epoch {e}: {chunk}"
        out.append(chunk[0])
    return out


@pytest.mark.parametrize("epochs", [2, 5, 10, 50, 200])
def test_warmup_one_then_cosine_equals_pytorch_wrapped_as_dassl(epochs):
    lr, wlr = 0.002, 1e-5
    want = dassl_sequence(lr, epochs, 1, wlr)
    assert want == pytest.approx(sequential_sequence(lr, epochs, 1, wlr), rel=1e-12, abs=1e-15)
    got = _suite_epochs(lr, epochs, 1, wlr)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert got[0] == wlr and got[1] == lr  # the first epoch after warm-up runs at the full lr


@pytest.mark.parametrize("warmup", [0, 2, 3])
def test_other_warmup_lengths_equal_pytorch(warmup):
    lr, epochs = 0.0035, 8
    want = dassl_sequence(lr, epochs, warmup, 1e-5)
    assert _suite_epochs(lr, epochs, warmup, 1e-5) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_maple_five_epochs_summed_lr():
    """MaPLe's recipe (lr 0.0035, 5 epochs, one warm-up epoch at 1e-5): Dassl's summed lr is
    0.010176; the suite ran one epoch ahead before (0.007010)."""
    seq = _suite_epochs(0.0035, 5, 1, 1e-5)
    assert sum(seq) == pytest.approx(sum(dassl_sequence(0.0035, 5, 1, 1e-5)), rel=1e-12)
    assert sum(seq) == pytest.approx(1e-5 + 0.0035 / 2 * sum(1 + math.cos(math.pi * t / 5) for t in range(4)))
    shifted = 1e-5 + 0.0035 / 2 * sum(1 + math.cos(math.pi * e / 5) for e in range(1, 5))
    assert abs(sum(seq) - shifted) > 3e-3


def test_per_iteration_cosine_equals_pytorch_stepped_per_iteration():
    """CLIP-LoRA: CosineAnnealingLR(total_iters, eta_min=1e-6) stepped after every iteration."""
    total, lr = 37, 2e-4
    want = _run(lambda opt: CosineAnnealingLR(opt, total, eta_min=1e-6), lr, total)
    tc = _tc(lr, 0, 0.0, unit="iteration", lr_min=1e-6)
    got = [lr_at(s, total, 5, tc) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-9)


def test_engine_trains_each_epoch_at_dassls_lr(tmp_path):
    """End to end: the lr the engine logs at each step of a real run."""
    epochs = 4
    cfg = toy_cfg(shots=4, sets=[f"train.epochs={epochs}", "train.batch_size=4", "train.lr=0.05",
                                 "train.warmup_epochs=1", "train.warmup_lr=0.001", "train.log_every=1"])
    Engine(tmp_path).run(cfg)
    recs = [json.loads(line) for line in (run_dir(tmp_path, cfg) / "log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "lr" in r and "step" in r]
    spe = len(recs) // epochs
    assert spe >= 1 and len(recs) == spe * epochs
    want = dassl_sequence(0.05, epochs, 1, 0.001)
    for r in recs:
        assert r["lr"] == pytest.approx(want[(r["step"] - 1) // spe], rel=1e-9)


def _revision1_hash(cfg) -> str:
    """The config hash of a trained method's run on the test split as it was before the schedule
    fix, written out from the config tree: the hashed fields, the default split left out."""
    from benchmark.config import hashable_dict
    from benchmark.data import sha256_json

    tree = hashable_dict(cfg)
    assert tree["eval"].pop("split") == "test"
    return sha256_json(tree)[:16]


def _finished(results, cfg, chash) -> None:
    """A finished run's files as the tables read them, recorded with the config hash ``chash``."""
    import numpy as np

    d = run_dir(results, cfg)
    d.mkdir(parents=True)
    np.savez(d / "predictions.npz", test_logits=np.zeros((1, 3)))
    (d / "result.json").write_text(json.dumps({
        "metrics": {"acc": 0.0}, "config_hash": chash, "split_hash": "s", "cost": {}, "method": cfg.method,
        "dataset": cfg.dataset, "shots": cfg.shots, "seed": cfg.seed}))


def test_runs_of_the_first_warm_up_schedule_are_stale_runs_it_did_not_change_are_not(tmp_path):
    """The fix changed the learning rates of a cosine after a warm-up only: a run recorded with the
    hash of that time is stale there, and complete without a warm-up or with a constant schedule."""
    from benchmark.config import _hash_tree
    from benchmark.experiment import build_grid, load_experiment

    warm = toy_cfg("coop", seed=1, sets=["train.warmup_epochs=1", "train.scheduler=cosine"])
    none = toy_cfg("coop", seed=2, sets=["train.warmup_epochs=0", "train.scheduler=cosine"])
    const = toy_cfg("coop", seed=3, sets=["train.warmup_epochs=1", "train.scheduler=constant"])
    for cfg in (warm, none, const):
        _finished(tmp_path, cfg, _revision1_hash(cfg))
    eng = Engine(tmp_path)
    assert eng.status(warm) == "stale"
    assert eng.status(none) == "complete" and eng.status(const) == "complete"
    # the embedded world trains without warm-up: none of its hashes carries the revision
    runs = build_grid(load_experiment("embedded")).runs
    assert runs and all("schedule_revision" not in _hash_tree(c).get("train", {}) for c in runs)
