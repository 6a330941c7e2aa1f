"""The method contract: sample ids in every batch (both streams, across a resume)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.engine import Engine, run_dir
from benchmark.loader import build_transforms
from benchmark.method import Method, Prediction, StepOutput, softmax_scores
from benchmark.protocol import load_or_create
from benchmark.registry import METHODS, register_method
from conftest import toy_cfg


class _Crash(Exception):
    pass


class IdRecorder(Method):
    """Records each step's batch (ids, labels, images of the deterministic test view)."""

    uses_unlabeled = True
    labeled_views = ("test",)
    unlabeled_views = ("test",)
    log: list = []
    crash_at = None

    def __init__(self, cfg, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        self.w = nn.Parameter(torch.zeros(backbone.embed_dim, ctx.num_classes))

    def training_step(self, batch, state):
        if state.step == IdRecorder.crash_at:
            raise _Crash(state.step)
        IdRecorder.log.append((state.step, list(batch.ids), batch.y.tolist(), list(batch.u_ids),
                               batch.x["test"].clone(), batch.u["test"].clone()))
        f = self.backbone.encode_image(batch.x["test"]).pooled.detach()
        return StepOutput(loss=F.cross_entropy(f @ self.w, batch.y))

    def predict(self, images):
        logits = self.backbone.encode_image(images).pooled @ self.w
        return Prediction(logits=logits, scores=softmax_scores(logits, 1.0))


@pytest.fixture
def recorder():
    register_method("id_recorder")(IdRecorder)
    IdRecorder.log, IdRecorder.crash_at = [], None
    yield IdRecorder
    METHODS.unregister("id_recorder")


SETS = ["train.epochs=3", "train.batch_size=3", "ssl.unlabeled_batch_size=5", "train.checkpoint_every=1"]


def test_batch_ids_match_the_manifest_for_both_streams_across_a_resume(tmp_path, recorder):
    cfg = toy_cfg("id_recorder", shots=3, sets=SETS)  # 9 labeled images: 3 steps per epoch, 9 steps
    Engine(tmp_path / "full").run(cfg)
    full = list(recorder.log)
    assert [s for s, *_ in full] == list(range(9))
    # the same run, interrupted at step 5 and resumed from its checkpoint
    recorder.log, recorder.crash_at = [], 5
    eng = Engine(tmp_path / "resumed")
    with pytest.raises(_Crash):
        eng.run(cfg)
    recorder.crash_at = None
    first = list(recorder.log)
    recorder.log = []
    r = eng.run(cfg)
    assert r["cost"]["resumed_from_step"] == 5
    resumed = first + recorder.log
    assert [s for s, *_ in resumed] == list(range(9))
    for a, b in zip(full, resumed):
        assert a[:4] == b[:4] and torch.equal(a[4], b[4]) and torch.equal(a[5], b[5])

    split = load_or_create(eng.dataset("toy", cfg), 3, 1, tmp_path / "resumed")
    labeled = {sid: c for sid, c in split.manifest["labeled"]}
    pos = {sid: i for i, sid in enumerate(split.train.ids)}
    tf = build_transforms(eng.backbone(cfg.backbone, torch.device("cpu")).preprocess_cfg, cfg.data)["test"]
    seen_l, seen_u = [], []
    for step, ids, y, u_ids, x, u in resumed:
        # each id names the image that is in the batch, with the manifest's label
        assert y == [labeled[i] for i in ids]
        assert torch.equal(x, torch.stack([tf(split.train.image(pos[i])) for i in ids]))
        assert torch.equal(u, torch.stack([tf(split.train.image(pos[i])) for i in u_ids]))
        if step < 3:  # the first epoch of the labeled stream
            seen_l += ids
        seen_u += u_ids
    assert sorted(seen_l) == sorted(labeled)  # one epoch = every labeled sample once
    # 9 steps x 5 = 45 unlabeled images: the first 9 full batches of an epoch over 48 training images
    assert len(set(seen_u)) == len(seen_u) == 45 and set(seen_u) <= set(split.train.ids)
    assert set(split.train.ids) - set(labeled) & set(seen_u)  # the pool holds unlabeled images too


# -- setup -----------------------------------------------------------------------------------------
class SetupRecorder(Method):
    """Training-free by its instance (a property), with a learned buffer filled in setup."""

    setup_features = True
    setup_unlabeled = True
    frozen_image_encoder = True
    learned_buffers = ("centroids",)
    seen: dict = {}

    def __init__(self, cfg, backbone, ctx):
        super().__init__(cfg, backbone, ctx)
        self.unused = nn.Parameter(torch.zeros(3))  # a trainable parameter that must not be trained
        self.register_buffer("centroids", torch.zeros(ctx.num_classes, backbone.embed_dim))

    @property
    def trains(self):
        return False

    def setup(self, labeled, unlabeled=None):
        SetupRecorder.seen.update(labeled=labeled, unlabeled=unlabeled, ctx=self.ctx,
                                  augmented=[labeled.augmented(2), labeled.augmented(2)])
        for c in range(self.ctx.num_classes):
            self.centroids[c] = F.normalize(labeled.features[labeled.labels == c].mean(0), dim=-1)

    def after_train(self):
        SetupRecorder.seen["after_train"] = SetupRecorder.seen.get("after_train", 0) + 1

    def predict_features(self, features):
        logits = F.normalize(features, dim=-1) @ self.centroids.t()
        return Prediction(logits=logits, scores=softmax_scores(logits, 1.0))


@pytest.fixture
def setup_recorder():
    register_method("setup_recorder")(SetupRecorder)
    SetupRecorder.seen = {}
    yield SetupRecorder
    METHODS.unregister("setup_recorder")


def test_setup_gets_the_manifest_labeled_set_and_the_pool_without_labels(tmp_path, setup_recorder):
    import dataclasses

    from benchmark.method import UnlabeledPool

    eng = Engine(tmp_path)
    cfg = toy_cfg("setup_recorder", shots=3)
    r = eng.run(cfg)
    seen = setup_recorder.seen
    split = load_or_create(eng.dataset("toy", cfg), 3, 1, tmp_path)
    lab, pool = seen["labeled"], seen["unlabeled"]
    assert lab.ids == [sid for sid, _ in split.manifest["labeled"]]
    assert lab.labels.tolist() == [c for _, c in split.manifest["labeled"]]
    # the features are the frozen CLIP's test-view features of exactly those images
    bb = eng.backbone(cfg.backbone, torch.device("cpu"))
    tf = build_transforms(bb.preprocess_cfg, cfg.data)["test"]
    pos = {sid: i for i, sid in enumerate(split.train.ids)}
    with torch.no_grad():
        want = bb.encode_image(torch.stack([tf(split.train.image(pos[i])) for i in lab.ids])).pooled
    torch.testing.assert_close(lab.features, want, rtol=1e-5, atol=1e-5)
    # the pool: every training image's id and feature, and no field that could carry a label
    assert pool.ids == list(split.train.ids) and pool.features.shape == (len(split.train), bb.embed_dim)
    torch.testing.assert_close(pool.features[[pos[i] for i in lab.ids]], lab.features, rtol=0, atol=0)
    assert [f.name for f in dataclasses.fields(UnlabeledPool)] == ["ids", "features"]
    # only the K known class names reach the method
    names = Engine(tmp_path).dataset("toy", cfg).classnames()
    assert seen["ctx"].classnames == names[:3] and not set(names[3:]) & set(seen["ctx"].classnames)
    # augmented views: deterministic, distinct rounds, different from the test view
    a1, a2 = seen["augmented"]
    assert a1.shape == (2, 9, bb.embed_dim) and torch.equal(a1, a2)
    assert not torch.allclose(a1[0], a1[1]) and not torch.allclose(a1[0], lab.features)
    # training-free by its instance: no optimiser, no loop, no checkpoint; the learned buffer is saved
    d = run_dir(tmp_path, cfg)
    assert seen["after_train"] == 1 and r["cost"]["steps"] == 0
    assert sorted(p.name for p in d.iterdir()) == ["learned.pt", "predictions.npz", "result.json"]
    learned = torch.load(d / "learned.pt")
    assert sorted(learned) == ["centroids", "unused"] and learned["centroids"].abs().sum() > 0
    assert torch.equal(learned["unused"], torch.zeros(3))  # never optimised
    # the method's predictions use what setup built: nearest labeled centroid
    with np.load(d / "predictions.npz") as z:
        cent = torch.stack([F.normalize(want[lab.labels == c].mean(0), dim=-1) for c in range(3)])
        np.testing.assert_allclose(z["labeled_logits"], (F.normalize(want, dim=-1) @ cent.t()).numpy(),
                                   rtol=1e-5, atol=1e-5)


# -- the default grid is data ----------------------------------------------------------------------
PLUGIN = '''
from benchmark.method import Method
from benchmark.registry import register_method


@register_method("extra_zero_shot")
class Extra(Method):
    trains = False
'''


def test_a_plugin_added_under_the_plugin_path_never_changes_the_default_grid(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from benchmark.experiment import DEFAULT_EXPERIMENT, build_grid, load_experiment, method_sets
    from conftest import ROOT, TESTS

    def runs(grid):
        return [[r.label, r.dataset, r.shots, r.seed] for r in grid.runs]

    here = runs(build_grid(load_experiment(DEFAULT_EXPERIMENT)))
    paper = method_sets()["paper"]
    assert len(here) == len(paper) * 4 * 2 * 3 == 192 and {r[0] for r in here} == set(paper)
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "extra_zero_shot.py").write_text(PLUGIN)
    code = ("import json; from benchmark.experiment import DEFAULT_EXPERIMENT, build_grid, load_experiment; "
            "from benchmark.registry import METHODS; exp = load_experiment(DEFAULT_EXPERIMENT); "
            "g = build_grid(exp); n = build_grid(exp, methods=['extra_zero_shot', 'zsclip'], seeds=[1]); "
            "print(json.dumps({'registered': 'extra_zero_shot' in METHODS, "
            "'runs': [[r.label, r.dataset, r.shots, r.seed] for r in g.runs], "
            "'named': sorted({r.label for r in n.runs}), 'all': METHODS.names()}))")
    env = dict(os.environ, OSSL_PLUGIN_PATH=os.pathsep.join([str(TESTS / "plugins"), str(tmp_path)]),
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["registered"] and got["runs"] == here  # same runs, same order
    assert got["named"] == ["extra_zero_shot", "zsclip"]  # it runs when named
    assert "extra_zero_shot" in got["all"]  # and `methods: all` means every registered method


def test_labeled_train_rows_select_the_stream_and_bad_rows_fail_clearly():
    from types import SimpleNamespace

    import numpy as np
    import pytest

    from benchmark.engine import labeled_train_idx
    from benchmark.errors import BenchmarkError

    split, cfg = SimpleNamespace(labeled_idx=np.array([5, 7, 9, 11])), SimpleNamespace(method="m")

    def rows(r):
        return SimpleNamespace(labeled_train_rows=lambda: r)

    assert labeled_train_idx(cfg, rows(None), split) is split.labeled_idx
    assert labeled_train_idx(cfg, rows(torch.tensor([0, 3])), split).tolist() == [5, 11]
    for bad in ([], [0, 0], [4], [-1], [0.5]):
        with pytest.raises(BenchmarkError, match=r"m.labeled_train_rows\(\) must give distinct integer rows"):
            labeled_train_idx(cfg, rows(bad), split)
