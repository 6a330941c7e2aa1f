"""The embedded world: deterministic generator, hard-unknown structure, the tiny CLIP checkpoint."""
import json
import sys

import numpy as np
import pytest

from benchmark import ROOT
from benchmark.errors import BenchmarkError
from benchmark.registry import DATASETS

sys.path.insert(0, str(ROOT / "datasets"))
import _world as W  # noqa: E402

NAMES = ["synth_dogs", "synth_cars", "synth_cub", "synth_aircraft"]


def test_render_is_deterministic():
    a = W.render("birds", (1, 2, 3), np.random.default_rng(5))
    b = W.render("birds", (1, 2, 3), np.random.default_rng(5))
    c = W.render("birds", (1, 2, 3), np.random.default_rng(6))
    assert a.shape == (W.SIZE, W.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("family", list(W.FAMILIES))
def test_marker_is_a_local_cue(family):
    """Two classes that differ only in the marker (the part colour) differ in a few patches of the
    same draw: the cue is local, not global (the same generator state gives the same nuisances)."""
    patch = 8  # the tiny CLIP's patch size
    for seed in range(5):
        a = W.render(family, (0, 0, 1), np.random.default_rng(seed)).astype(int)
        b = W.render(family, (0, 3, 1), np.random.default_rng(seed)).astype(int)
        changed = np.abs(a - b).max(-1) > 30
        per_patch = changed.reshape(W.SIZE // patch, patch, W.SIZE // patch, patch).any((1, 3))
        assert 1 <= per_patch.sum() <= 9, per_patch.sum()  # of 36 patches
        assert changed.mean() < 0.08  # of the pixels


@pytest.mark.parametrize("name", NAMES)
def test_datasets_sizes_names_and_hard_unknowns(name):
    ds = DATASETS.get(name)()
    names = ds.classnames()
    assert len(names) == 24 and len(set(names)) == 24
    assert "{}" in ds.template and not ds.needs_root
    classes = W.benchmark_classes(ds.family)
    for j in range(12):
        diff = [k for k in range(3) if classes[j][k] != classes[12 + j][k]]
        assert len(diff) == 1 and diff[0] in (1, 2)  # the twin differs in one LOCAL attribute
    pre = set(W.pretraining_combos(ds.family))
    assert not pre & set(classes)  # no benchmark class is seen in pretraining ...
    for k in range(3):  # ... but every attribute value (word) is
        assert {c[k] for c in pre} == {0, 1, 2, 3}


def test_dataset_arrays_are_deterministic_and_balanced():
    W.dataset_arrays.cache_clear()
    imgs, labels = W.dataset_arrays("cars", "test", 15)
    W.dataset_arrays.cache_clear()
    imgs2, labels2 = W.dataset_arrays("cars", "test", 15)
    assert np.array_equal(imgs, imgs2) and np.array_equal(labels, labels2)
    assert np.bincount(labels).tolist() == [15] * 24
    train, _ = W.dataset_arrays("cars", "train", 30)
    assert not np.array_equal(train[:15], imgs[:15])


def test_checkpoint_is_verified(tmp_path):
    from benchmark.tinyclip import CHECKPOINT, RECORD, file_sha256, tiny_clip_checkpoint

    assert tiny_clip_checkpoint() == CHECKPOINT
    assert file_sha256(CHECKPOINT) == json.loads(RECORD.read_text())["sha256"]
    bad = tmp_path / "corrupt.pt"
    data = bytearray(CHECKPOINT.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(BenchmarkError, match="pretrain_tinyclip.py"):
        tiny_clip_checkpoint(bad)
    with pytest.raises(BenchmarkError, match="missing"):
        tiny_clip_checkpoint(tmp_path / "absent.pt")


def test_unknown_synthetic_dataset_lists_the_known_ones():
    from benchmark.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="synth_cub"):
        DATASETS.get("synth_bird")


def test_calibration_bands_loosely():
    from _calibration import calibrate

    r = calibrate(datasets=("synth_cub",))["synth_cub"]
    assert 15 <= r["zs_acc"] <= 85 and 50 <= r["zs_auroc"] <= 90
    assert r["probe_acc"] > r["zs_acc"]


def test_tiny_clip_reads_every_attribute():
    """Each attribute (the local part colour included) is read well above chance (25 %) when the other
    two are given: an unreadable attribute would make its hard unknowns exact look-alikes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_embedded", ROOT / "scripts" / "calibrate_embedded.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.attribute_probe(datasets=("synth_cub",))["synth_cub"]
    assert min(r.values()) >= 45, r


def test_render_masks_cover_exactly_what_the_object_and_its_part_change():
    """render(with_masks=True) gives the same image, and its masks are where the pixels change when
    only the body colour (object mask) or only the marker colour (part mask) changes, with the same
    random stream (so position, rotation, background and noise are the same)."""
    for family in W.FAMILIES:
        for seed in (3, 4):
            img = W.render(family, (0, 0, 0), np.random.default_rng(seed))
            same, obj, part = W.render(family, (0, 0, 0), np.random.default_rng(seed), with_masks=True)
            assert np.array_equal(img, same)
            body = W.render(family, (2, 0, 0), np.random.default_rng(seed)).astype(int)
            marker = W.render(family, (0, 1, 0), np.random.default_rng(seed)).astype(int)
            changed_body = np.abs(body - img.astype(int)).max(-1) > 30
            changed_marker = np.abs(marker - img.astype(int)).max(-1) > 30
            assert changed_body.sum() > 50 and changed_marker.sum() > 5
            # changed pixels lie on the mask (edges: partial coverage) and the mask's interior changed
            assert (obj[changed_body] > 0).mean() > 0.98
            assert (part[changed_marker] > 0).mean() > 0.98
            assert changed_marker[part > 0.99].mean() > 0.9
            assert 0.05 < obj.mean() < 0.8 and part.sum() < obj.sum()


def test_dataset_masks_follow_dataset_arrays_image_for_image():
    kw = dict(n_known=2, seed=0, difficulty=3.0, cast=(1.2, 0.95, 0.75))
    imgs, labels = W.dataset_arrays("dogs", "val", 2, **kw)
    obj, part = W.dataset_masks("dogs", "val", 2, **kw)
    assert obj.shape == part.shape == imgs.shape[:3]
    rng = np.random.default_rng([0, list(W.FAMILIES).index("dogs"), W.SPLIT_STREAMS["val"]])
    classes = W.benchmark_classes("dogs", 2, 0)
    for i, y in enumerate(labels):
        img, o, p = W.render("dogs", classes[y], rng, 3.0, (1.2, 0.95, 0.75), with_masks=True)
        assert np.array_equal(img, imgs[i]) and np.array_equal(o, obj[i]) and np.array_equal(p, part[i])
    assert not np.array_equal(obj[0], obj[1])
