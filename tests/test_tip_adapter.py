"""Tip-Adapter and Tip-Adapter-F: zero-shot at alpha = 0, cache = labeled features, the alpha/beta
search on held-out labeled images only (against a brute-force search), runs at any batch size."""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.engine import Engine, run_dir
from benchmark.loader import build_transforms, encode_augmented, sample_seed
from benchmark.method import LabeledSet, MethodContext
from benchmark.protocol import load_or_create
from benchmark.registry import DATASETS, METHODS
from conftest import toy_cfg

CTX = MethodContext(["thing a", "thing b", "thing c"], "a photo of a {}.", "toy", 5, 1)


def _labeled(backbone, n_per_class=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    feats = torch.randn(len(labels), backbone.embed_dim, generator=g) + 2 * torch.randn(3, backbone.embed_dim, generator=g)[labels]
    return LabeledSet(ids=[f"s{i}" for i in range(len(labels))], labels=labels, features=feats)


def _tip(backbone, name="tip_adapter", **params):
    cls = METHODS.get(name)
    return cls(cls.Config(**{"augment_epochs": 0, **params}), backbone, CTX)


def test_alpha_zero_is_zero_shot_exactly_and_keys_are_the_labeled_features(micro_backbone):
    lab = _labeled(micro_backbone)
    m = _tip(micro_backbone, init_alpha=0.0, search=False)
    m.setup(lab)
    m.after_train()
    assert float(m.alpha) == 0.0
    assert torch.equal(m.cache_keys, F.normalize(lab.features, dim=-1))
    assert torch.equal(m.cache_values, F.one_hot(lab.labels, 3).float())
    f = torch.randn(7, micro_backbone.embed_dim)
    zs = METHODS.get("zsclip")(None, micro_backbone, CTX)
    with torch.no_grad():
        assert torch.equal(m.predict_features(f).logits, zs.predict_features(f).logits)
        m.alpha.fill_(1.0)  # the cache does change the logits
        assert not torch.allclose(m.predict_features(f).logits, zs.predict_features(f).logits, atol=1e-3)


def test_search_uses_the_held_out_labeled_images_only(micro_backbone):
    lab = _labeled(micro_backbone)
    m = _tip(micro_backbone, search_step=[15, 6])
    m.setup(lab)
    m.after_train()
    val = m.val_rows.tolist()
    assert len(val) == 3 and sorted(lab.labels[val].tolist()) == [0, 1, 2]  # round(0.2 x 5) per class
    fit = [i for i in range(15) if i not in val]
    # brute force, written out independently (numpy), on a cache without the held-out images
    K = F.normalize(lab.features[fit], dim=-1).numpy().astype(np.float64)
    V = np.eye(3)[lab.labels[fit].numpy()]
    fv = F.normalize(lab.features[val], dim=-1).numpy().astype(np.float64)
    W = m.text_weights.numpy().astype(np.float64)
    s = float(micro_backbone.logit_scale)
    best = (-1, None, None)
    for b in [0.1 + i * (7 - 0.1) / 15 for i in range(15)]:
        for a in [0.1 + i * (3 - 0.1) / 6 for i in range(6)]:
            acc = ((s * fv @ W.T + a * np.exp(-b * (1 - fv @ K.T)) @ V).argmax(1) == lab.labels[val].numpy()).mean()
            if acc > best[0]:
                best = (acc, a, b)
    assert float(m.alpha) == pytest.approx(best[1]) and float(m.beta) == pytest.approx(best[2])
    # the final cache holds every labeled image
    assert torch.equal(m.cache_keys, F.normalize(lab.features, dim=-1))
    # Tip-Adapter-F: the held-out images are neither in its cache nor in its loss
    mf = _tip(micro_backbone, "tip_adapter_f")
    mf.setup(lab)
    assert torch.equal(mf.cache_keys.detach(), F.normalize(lab.features[fit], dim=-1))
    assert mf.cache_keys.requires_grad and [n for n, p in mf.named_parameters() if p.requires_grad] == ["cache_keys"]


def test_augmented_features_follow_the_documented_seeding(micro_backbone):
    train = DATASETS.get("toy")().load("train")
    cfg = toy_cfg("tip_adapter")
    tf = build_transforms(micro_backbone.preprocess_cfg, cfg.data)["weak"]
    idx = np.array([3, 17, 40])
    got = encode_augmented(micro_backbone, train, idx, tf, 2, 7, 2, "cpu", contextlib.nullcontext)
    want = []
    for r in range(2):
        imgs = []
        for k, i in enumerate(idx):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(7, 3, r, k))
                imgs.append(tf(train.image(int(i))))
        with torch.no_grad():
            want.append(micro_backbone.encode_image(torch.stack(imgs)).pooled)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bs", [3, 256])
def test_engine_runs_at_any_batch_size(tmp_path, bs):
    eng = Engine(tmp_path)
    sets = [f"train.batch_size={bs}", "params.augment_epochs=2", "params.search_step=[10,5]"]
    cfg = toy_cfg("tip_adapter_f", shots=5, sets=sets + ["train.epochs=2"])
    r = eng.run(cfg)
    learned = torch.load(run_dir(tmp_path, cfg) / "learned.pt")
    assert learned["cache_keys"].shape[0] == learned["cache_values"].shape[0] == 12  # 15 - 3 held out
    assert r["cost"]["steps"] == 2 * (15 // bs if 15 >= bs else 1)  # counted on the whole labeled set
    free = toy_cfg("tip_adapter", shots=5, sets=sets + ["params.augment_epochs=0"])
    eng.run(free)
    d = run_dir(tmp_path, free)
    assert sorted(p.name for p in d.iterdir()) == ["learned.pt", "predictions.npz", "result.json"]
    split = load_or_create(eng.dataset("toy", free), 5, 1, tmp_path)
    bb = eng.backbone(free.backbone, torch.device("cpu"))
    tf = build_transforms(bb.preprocess_cfg, free.data)["test"]
    with torch.no_grad():
        feats = bb.encode_image(torch.stack([tf(split.train.image(int(i))) for i in split.labeled_idx])).pooled
    keys = torch.load(d / "learned.pt")["cache_keys"]
    torch.testing.assert_close(keys, F.normalize(feats, dim=-1), rtol=1e-5, atol=1e-5)  # manifest order


@pytest.mark.parametrize("cached_views", [0, 2])
def test_f_trains_on_full_batches_of_its_fit_rows_only(tmp_path, monkeypatch, cached_views):
    """Tip-Adapter-F's labeled stream holds only the rows outside its hold-out: every batch is full,
    each pass over the stream holds every fit row once, no held-out image is ever loaded or encoded,
    and the steps are those of the whole labeled set (15 // 4 = 3 per epoch, 2 epochs); with
    data.cached_views its frozen features are served by the engine (no weak images are loaded)."""
    cls, seen = METHODS.get("tip_adapter_f"), []
    real = cls.training_step

    def recording(self, batch, state):
        seen.append((self, list(batch.ids), sorted(batch.x)))
        return real(self, batch, state)

    monkeypatch.setattr(cls, "training_step", recording)
    sets = ["train.batch_size=4", "train.epochs=2", "params.augment_epochs=0", "params.search_step=[4,2]",
            f"data.cached_views={cached_views}"]
    cfg = toy_cfg("tip_adapter_f", shots=5, sets=sets)
    Engine(tmp_path).run(cfg)
    method = seen[0][0]
    split = load_or_create(Engine(tmp_path).dataset("toy", cfg), 5, 1, tmp_path)
    labeled_ids = [split.train.ids[i] for i in split.labeled_idx]
    held_out = {labeled_ids[i] for i in method.val_rows.tolist()}
    fit = sorted(set(labeled_ids) - held_out)
    assert len(held_out) == 3 and len(fit) == 12
    batches = [ids for _, ids, _ in seen]
    assert len(batches) == 2 * 3 and all(len(b) == 4 for b in batches)  # = 2 passes over the 12 fit rows
    for epoch in (batches[:3], batches[3:]):
        assert sorted(i for b in epoch for i in b) == fit
    assert all(views == ([] if cached_views else ["weak"]) for _, _, views in seen)


def test_run_all_runs_both_at_an_odd_batch_size(tmp_path, capsys):
    import yaml

    from benchmark.cli import main
    from conftest import TOY_EXPERIMENT

    exp = tmp_path / "toy.yaml"
    exp.write_text(yaml.safe_dump({**TOY_EXPERIMENT, "methods": ["tip_adapter", "tip_adapter_f"],
                                   "datasets": ["toy"], "shots": [4], "seeds": [1]}))
    sets = ["train.batch_size=5", "params.augment_epochs=1", "params.search_step=[8,4]", "train.epochs=2"]
    args = ["--experiment", str(exp), "--results-dir", str(tmp_path / "res"), "--no-figures"]
    assert main(args + sum([["--set", s] for s in sets], [])) == 0
    results = {p.parent.parent.name: p for p in (tmp_path / "res" / "runs").rglob("result.json")}
    assert sorted(results) == ["tip_adapter", "tip_adapter_f"]
    assert main(["--list"]) == 0
    listed = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("tip_adapter")]
    assert len(listed) == 2 and all("not a paper method" in ln for ln in listed)
