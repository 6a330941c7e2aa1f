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
