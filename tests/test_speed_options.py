"""Speed options: cached frozen passes (data.cached_views) against recomputing them."""
import numpy as np
import pytest
import torch

from benchmark.engine import Engine, autocast_for
from benchmark.loader import StepBatches, ViewDataset, ViewFeatureCache, build_transforms
from benchmark.method import Batch, MethodContext, StepState
from benchmark.protocol import load_or_create
from benchmark.registry import METHODS
from conftest import toy_cfg

N_VIEWS = 3


def _setup(tmp_path, method, sets=()):
    cfg = toy_cfg(method, shots=4, sets=[f"data.cached_views={N_VIEWS}", *sets])
    engine = Engine(tmp_path, log=lambda s: None)
    device = torch.device("cpu")
    split = load_or_create(engine.dataset("toy", cfg), cfg.shots, cfg.seed, tmp_path)
    bb = engine.backbone(cfg.backbone, device)
    views = build_transforms(bb.preprocess_cfg, cfg.data)
    ctx = MethodContext(classnames=split.id_classnames, template="a photo of a {}.", dataset="toy",
                        shots=cfg.shots, seed=cfg.seed)
    torch.manual_seed(0)
    m = METHODS.get(method)(cfg.params, bb, ctx)
    m.train()
    return cfg, engine, split, bb, views, m


def _loss_and_grads(m, batch):
    m.zero_grad(set_to_none=True)
    loss = m.training_step(batch, StepState(0, 10, 0, 10)).loss
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


@pytest.mark.parametrize("method", ["coop", "locoop", "clip_adapter"])
def test_cached_views_give_the_logits_and_gradients_of_recomputed_passes(tmp_path, method):
    cfg, engine, split, bb, views, m = _setup(tmp_path, method)
    fields = m.frozen_train_outputs
    assert "pooled" in fields
    serve = engine._view_cache(cfg, split, views, torch.device("cpu"), autocast_for(torch.device("cpu"), "off"),
                               split.labeled_idx, 8, "labeled", tuple(fields))
    assert serve is not None
    for step in (0, 3):
        pairs = StepBatches(split.labeled_idx, 8, cfg.seed, "labeled", 0, 0).batch(step)
        ids = [split.train.ids[i] for i, _ in pairs]
        served = serve(step, ids)
        # recompute: the same views rendered from their seeds, encoded in this batch
        ds = ViewDataset(split.train, {"weak": views["weak"]})
        imgs = torch.stack([ds[(i, ViewFeatureCache.view_seed(split.train.ids[i], s % N_VIEWS))][0]["weak"]
                            for i, s in pairs])
        y = torch.from_numpy(split.train.labels[[i for i, _ in pairs]])
        with torch.no_grad():
            ref = bb.encode_image(imgs, return_value_local="value_local" in fields)
        torch.testing.assert_close(served.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
        if "value_local" in fields:
            torch.testing.assert_close(served.value_local, ref.value_local, rtol=1e-5, atol=1e-5)
        l_cached, g_cached = _loss_and_grads(m, Batch(x={}, y=y, ids=ids, features={"weak": served}))
        l_recomp, g_recomp = _loss_and_grads(m, Batch(x={"weak": imgs}, y=y, ids=ids))
        torch.testing.assert_close(l_cached, l_recomp, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_cached, g_recomp):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # several views per image are in use, and a sample's view changes between epochs
    seeds = [s % N_VIEWS for st in range(6) for _, s in StepBatches(split.labeled_idx, 8, cfg.seed, "labeled", 0, 0).batch(st)]
    assert len(set(seeds)) == N_VIEWS


def test_cached_views_are_shared_across_methods_and_seeds_and_persist(tmp_path, monkeypatch):
    """Two runs (CoOp seed 1, then CLIP-Adapter seed 2) of one engine encode each (image, view) once;
    a fresh engine reads them from disk; the option is part of the config hash (another stream)."""
    calls = []
    real = ViewDataset.__getitem__

    def counting(self, item):  # the view cache renders its views through a ViewDataset of view "v"
        if "v" in self.views:
            calls.append(item)
        return real(self, item)

    monkeypatch.setattr(ViewDataset, "__getitem__", counting)
    from benchmark.config import config_hash

    engine = Engine(tmp_path, log=lambda s: None)
    sets = [f"data.cached_views={N_VIEWS}", "train.epochs=2"]
    a = toy_cfg("coop", shots=4, seed=1, sets=sets)
    engine.run(a)
    first = len(calls)
    assert first == 4 * 3 * N_VIEWS  # 4 shots x 3 known classes of the toy split, each view once
    b = toy_cfg("clip_adapter", shots=4, seed=2, sets=sets + ["clip_adapter.params.train_features=augmented"])
    engine.run(b)
    split2 = load_or_create(engine.dataset("toy", b), 4, 2, tmp_path)
    split1 = load_or_create(engine.dataset("toy", a), 4, 1, tmp_path)
    new_ids = set(split2.labeled_idx.tolist()) - set(split1.labeled_idx.tolist())
    assert len(calls) - first == len(new_ids) * N_VIEWS < 12 * N_VIEWS  # only what seed 1 did not encode
    files = list((tmp_path / "cache" / "views").glob("toy-views3-*.pt"))
    assert len(files) == 1
    fresh = Engine(tmp_path, log=lambda s: None)
    calls.clear()
    fresh.run(toy_cfg("coop", shots=4, seed=2, sets=sets))
    assert len(calls) == 0  # everything came from disk
    assert config_hash(a) != config_hash(toy_cfg("coop", shots=4, seed=1, sets=["train.epochs=2"]))


def test_cached_views_do_not_apply_to_prompted_image_towers():
    """MaPLe, PLOT++ and CLIP-LoRA feed learned prompts or adapters into the image tower: nothing
    to cache; CLIP-Adapter's cached mode trains on engine-served test-view features instead."""
    for name in ("maple", "plot", "clip_lora", "cfsg_clip", "zsclip"):
        assert not METHODS.get(name).frozen_train_outputs
    for name in ("coop", "locoop", "clip_adapter"):
        assert METHODS.get(name).frozen_train_outputs


def test_cached_views_off_loads_and_encodes_images(tmp_path):
    cfg, engine, split, bb, views, m = _setup(tmp_path, "coop", sets=["data.cached_views=0"])
    assert engine._view_cache(cfg, split, views, torch.device("cpu"), autocast_for(torch.device("cpu"), "off"),
                              split.labeled_idx, 8, "labeled", ("pooled",)) is None
    with pytest.raises(Exception, match="cached_views"):
        cfg.data.cached_views = -1
        engine._view_cache(cfg, split, views, torch.device("cpu"), autocast_for(torch.device("cpu"), "off"),
                           split.labeled_idx, 8, "labeled", ("pooled",))
    # without served features a step encodes its images (the frozen_image fallback)
    imgs = torch.randn(2, 3, 32, 32)
    out = m.frozen_image(Batch(x={"weak": imgs}, y=torch.zeros(2, dtype=torch.long)))
    assert torch.equal(out.pooled, bb.encode_image(imgs).pooled)
