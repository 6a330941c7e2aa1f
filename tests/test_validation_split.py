"""The embedded datasets' validation split (issue 13): disjoint from train and test, drawn like the
test split, deterministic; runs with ``eval.split=val`` evaluate on it and nothing else changes."""
import json
import sys

import numpy as np
import pytest

from benchmark import ROOT
from benchmark.config import config_hash, resolve
from benchmark.engine import Engine, run_dir
from benchmark.errors import BenchmarkError, DatasetError
from benchmark.experiment import load_experiment
from benchmark.protocol import load_or_create
from benchmark.registry import DATASETS, METHODS

sys.path.insert(0, str(ROOT / "datasets"))
import _world as W  # noqa: E402


def _images(split):
    return np.stack([np.asarray(split.image(i)) for i in range(len(split))])


@pytest.mark.parametrize("name", ["synth_cub", "synth_aircraft"])
def test_validation_split_is_disjoint_from_train_and_test_and_drawn_like_test(name):
    plugin = DATASETS.get(name)()
    assert "val" in plugin.splits
    train, test, val = plugin.load("train"), plugin.load("test"), plugin.load("val")
    # the same classes and per-class counts as the test split (all 24 classes, 15 images each)
    assert np.array_equal(np.bincount(val.labels), np.bincount(test.labels))
    assert not set(val.ids) & set(test.ids) and not set(val.ids) & set(train.ids)
    # disjoint in content: no validation image equals any train or test image
    v, t, tr = _images(val), _images(test), _images(train)
    seen = {a.tobytes() for a in np.concatenate([t, tr])}
    assert not any(a.tobytes() in seen for a in v)
    # drawn like the test split: the test split's rendering settings on the validation stream, rebuilt
    # here by hand from the generator
    fam = plugin.family
    rng = np.random.default_rng([plugin.seed, list(W.FAMILIES).index(fam), W.SPLIT_STREAMS["val"]])
    classes = W.benchmark_classes(fam, plugin.n_known, plugin.seed)
    for i, y in enumerate(val.labels[:5]):  # class-major order: the first draws
        ref = W.render(fam, classes[y], rng, plugin.difficulty, plugin.cast, plugin.marker_scale)
        assert np.array_equal(v[i], ref)


def test_validation_split_is_deterministic_and_leaves_test_unchanged():
    W.dataset_arrays.cache_clear()
    a = DATASETS.get("synth_dogs")()
    test_before = _images(a.load("test"))
    val_a = _images(a.load("val"))
    W.dataset_arrays.cache_clear()  # a fresh draw, not the cached arrays
    b = DATASETS.get("synth_dogs")()
    val_b = _images(b.load("val"))
    assert np.array_equal(val_a, val_b)
    assert np.array_equal(_images(b.load("test")), test_before)
    assert a.load("val").fingerprint() == b.load("val").fingerprint()
    with pytest.raises(ValueError, match="val"):
        W.dataset_arrays("dogs", "validation", 1)


def test_eval_split_val_changes_only_the_held_out_images(tmp_path):
    plugin = DATASETS.get("synth_cub")()
    s_test = load_or_create(plugin, 5, 1, tmp_path)
    s_val = load_or_create(plugin, 5, 1, tmp_path, eval_split="val")
    assert s_val.manifest["labeled"] == s_test.manifest["labeled"]  # same labeled set and pool
    assert s_val.manifest["eval_split"] == "val" and "eval_split" not in s_test.manifest
    assert s_val.hash != s_test.hash and s_val.test.ids[0].startswith("val/")
    assert (tmp_path / "splits" / "synth_cub" / "shots5_seed1_val.json").exists()
    toy = DATASETS.get("toy")()
    with pytest.raises(DatasetError, match="val"):
        load_or_create(toy, 2, 1, tmp_path, eval_split="val")


def test_a_validation_run_sits_beside_the_test_run_and_reads_the_validation_images(tmp_path):
    exp = load_experiment("embedded")
    zs = METHODS.get("zsclip")
    cfg_test = resolve(zs, "synth_cub", 5, 1, exp, ["device=cpu"])
    cfg_val = resolve(zs, "synth_cub", 5, 1, exp, ["device=cpu", "eval.split=val"])
    assert run_dir(tmp_path, cfg_val) != run_dir(tmp_path, cfg_test)
    assert config_hash(cfg_val) != config_hash(cfg_test)
    eng = Engine(tmp_path)
    r_val, r_test = eng.run(cfg_val), eng.run(cfg_test)
    assert r_val["config"]["eval"]["split"] == "val"
    # independent check: accuracy recomputed from the saved predictions on the validation labels
    pred = np.load(run_dir(tmp_path, cfg_val) / "predictions.npz")
    val = DATASETS.get("synth_cub")().load("val")
    K = r_val["num_known"]
    id_rows = val.labels < K
    assert pred["test_ids"].tolist() == val.ids
    acc = 100 * (pred["test_logits"].argmax(-1)[id_rows] == val.labels[id_rows]).mean()
    assert r_val["metrics"]["acc"] == pytest.approx(acc)
    assert r_val["metrics"]["acc"] != r_test["metrics"]["acc"]
    json.loads((run_dir(tmp_path, cfg_test) / "result.json").read_text())  # both finished


def _fake_result(root, setting, split, acc):
    d = root / setting / "runs" / "synth_cub" / "coop" / "shots20_seed1"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({
        "method": "coop", "label": "coop", "dataset": "synth_cub", "shots": 20, "seed": 1,
        "metrics": {"acc": acc, "auroc": 60.0}, "config_hash": "h", "split_hash": "s", "cost": {},
        "config": {"eval": {"split": split}}}))


def test_the_sweep_reads_validation_runs_only(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import sweep_embedded as S

    _fake_result(tmp_path / "ok", "train.lr=0.1", "val", 70.0)
    _fake_result(tmp_path / "ok", "train.lr=0.2", "val", 80.0)
    text = S.table(tmp_path / "ok")
    assert "| train.lr=0.1 | coop | 70.0 |" in text and "| train.lr=0.2 | coop | 80.0 |" in text
    _fake_result(tmp_path / "mixed", "train.lr=0.1", "val", 70.0)
    _fake_result(tmp_path / "mixed", "train.lr=0.2", "test", 80.0)
    with pytest.raises(SystemExit, match="validation runs only"):
        S.table(tmp_path / "mixed")
    cut = tmp_path / "ok" / "train.lr=0.2" / "runs" / "synth_cub" / "coop" / "shots20_seed1" / "result.json"
    cut.write_text(cut.read_text()[:40])  # a damaged result is refused as the tables refuse it
    with pytest.raises(BenchmarkError, match="is damaged"):
        S.table(tmp_path / "ok")
    assert S.settings(["train.lr=0.1,0.2", "train.epochs=5,10"]) == [
        ["train.lr=0.1", "train.epochs=5"], ["train.lr=0.1", "train.epochs=10"],
        ["train.lr=0.2", "train.epochs=5"], ["train.lr=0.2", "train.epochs=10"]]
    with pytest.raises(SystemExit, match="validation split only"):
        S.settings(["eval.split=test"])
