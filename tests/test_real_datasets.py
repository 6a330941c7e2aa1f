"""Real-data plugins on small fake trees in every supported layout: counts, class order and names,
the ID/OOD boundary, agreement between layouts, error messages, and the decoded-image cache."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from benchmark.errors import ConfigError, DatasetError
from benchmark.protocol import build_manifest, load_or_create
from benchmark.registry import DATASETS

pytestmark = pytest.mark.filterwarnings("ignore:.*the official dataset has:UserWarning")


def _img(path: Path, seed: int, size=(20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)


def _cell(strings):
    a = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        a[i, 0] = s
    return a


def _plugin(name, root, **opts):
    return DATASETS.get(name)(root=root, **opts)


def _summary(p):
    tr, te = p.load("train"), p.load("test")
    return p.classnames(), sorted(zip(tr.ids, tr.labels.tolist())), sorted(zip(te.ids, te.labels.tolist()))


# -- CUB ------------------------------------------------------------------------------------------
CUB_FOLDERS = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
               "004.Groove_billed_Ani", "005.Crested_Auklet"]
CUB_NAMES = ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross", "Groove billed Ani",
             "Crested Auklet"]


def make_cub(root: Path, layout: str, sub="CUB_200_2011", json_up=False) -> Path:
    d = root / sub
    rows = []  # (image id, relative path, class 1-based, is_train)
    k = 0
    for c, f in enumerate(CUB_FOLDERS):
        for j in range(4):
            k += 1
            rel = f"{f}/{f.split('.', 1)[1]}_{j:04d}_{k}.jpg"
            _img(d / "images" / rel, k)
            rows.append((k, rel, c + 1, j < 3))  # 3 train, 1 test per class
    if layout == "official":
        (d / "classes.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(CUB_FOLDERS)))
        (d / "images.txt").write_text("".join(f"{k} {rel}\n" for k, rel, _, _ in rows))
        (d / "image_class_labels.txt").write_text("".join(f"{k} {c}\n" for k, _, c, _ in rows))
        (d / "train_test_split.txt").write_text("".join(f"{k} {int(t)}\n" for k, _, _, t in rows))
    else:  # a fork's split_zhou_CUB200.json: paths relative to images/, train/val split of train
        tr = [[rel, c - 1, f.split(".", 1)[1]] for k, rel, c, t in rows if t for f in [CUB_FOLDERS[c - 1]]]
        te = [[rel, c - 1, CUB_FOLDERS[c - 1].split(".", 1)[1]] for k, rel, c, t in rows if not t]
        js = {"train": tr[::2], "val": tr[1::2], "test": te}
        if json_up:  # a fork's cub/split_zhou_CUB200.json, paths relative to its own folder
            for rows in js.values():
                for r in rows:
                    r[0] = f"{d.name}/images/{r[0]}"
        (d.parent if json_up else d).joinpath("split_zhou_CUB200.json").write_text(json.dumps(js))
    return d


def test_cub_official(tmp_path):
    make_cub(tmp_path, "official")
    p = _plugin("cub", tmp_path)
    assert p.needs_root and p.template == "a photo of a {}, a type of bird."
    assert p.classnames() == CUB_NAMES
    tr, te = p.load("train"), p.load("test")
    assert (len(tr), len(te)) == (15, 5)
    assert tr.ids[0] == "images/001.Black_footed_Albatross/Black_footed_Albatross_0000_1.jpg"
    assert np.bincount(tr.labels).tolist() == [3] * 5
    img = tr.image(4)
    assert img.mode == "RGB" and img.size == (20, 14)
    ref = np.asarray(Image.open(tmp_path / "CUB_200_2011" / tr.ids[4]).convert("RGB"))
    assert np.array_equal(np.asarray(img), ref)


def test_cub_layouts_agree_and_folder_names(tmp_path):
    make_cub(tmp_path / "a", "official")
    make_cub(tmp_path / "b", "coop", sub="cub/CUB_200_2011")
    a, b = _plugin("cub", tmp_path / "a"), _plugin("cub", tmp_path / "b")
    assert b.index().layout == "coop" and a.index().layout == "official"
    assert _summary(a) == _summary(b)  # same classes, same ids, same labels
    make_cub(tmp_path / "c", "coop", sub="cub/CUB_200_2011", json_up=True)
    c = _plugin("cub", tmp_path / "c")
    assert c.index().layout == "coop" and _summary(c) == _summary(a)
    # the dataset folder itself as --data-root works too
    assert _plugin("cub", tmp_path / "a" / "CUB_200_2011").classnames() == CUB_NAMES


def test_official_wins_in_auto_and_layout_option(tmp_path):
    d = make_cub(tmp_path, "official")
    tr = json.loads(json.dumps({"train": [], "val": [], "test": []}))
    tr["train"] = [["001.Black_footed_Albatross/Black_footed_Albatross_0000_1.jpg", 0, "x"]]
    tr["test"] = [["001.Black_footed_Albatross/Black_footed_Albatross_0003_4.jpg", 0, "x"]]
    (d / "split_zhou_CUB.json").write_text(json.dumps(tr))
    assert len(_plugin("cub", tmp_path).load("train")) == 15
    assert len(_plugin("cub", tmp_path, layout="coop").load("train")) == 1


# -- Stanford Dogs ------------------------------------------------------------------------------
DOG_FOLDERS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog",
               "n02100236-German_short-haired_pointer", "n02113978-Mexican_hairless", "n02116738-African_hunting_dog",
               "n02088364-beagle"]
DOG_NAMES = ["Chihuahua", "Japanese spaniel", "Maltese dog", "German short-haired pointer", "Mexican hairless",
             "African hunting dog", "beagle"]


def make_dogs(root: Path, layout: str, lists_sub=False) -> Path:
    d = root / "stanford_dogs"
    train, test = [], []
    k = 0
    for c, f in enumerate(DOG_FOLDERS):
        for j in range(3):
            k += 1
            rel = f"{f}/{f.split('-')[0]}_{k}.jpg"
            _img(d / "Images" / rel, 100 + k)
            (train if j < 2 else test).append((rel, c + 1))
    if layout == "official":
        ld = d / "lists" if lists_sub else d
        ld.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train_list.mat", train), ("test_list.mat", test)):
            savemat(ld / name, {"file_list": _cell([r for r, _ in rows]),
                                "annotation_list": _cell([r[:-4] for r, _ in rows]),
                                "labels": np.array([[c] for _, c in rows], dtype=float)})
    else:
        js = {"train": [[f"Images/{r}", c - 1, DOG_FOLDERS[c - 1]] for r, c in train[:-3]],
              "val": [[f"Images/{r}", c - 1, DOG_FOLDERS[c - 1]] for r, c in train[-3:]],
              "test": [[f"Images/{r}", c - 1, DOG_FOLDERS[c - 1]] for r, c in test]}
        (d / "split_zhou_StanfordDogs.json").write_text(json.dumps(js))
    return d


def test_dogs_layouts(tmp_path):
    make_dogs(tmp_path / "a", "official")
    make_dogs(tmp_path / "b", "official", lists_sub=True)
    make_dogs(tmp_path / "c", "coop")
    a = _plugin("stanford_dogs", tmp_path / "a")
    assert a.template == "a photo of a {}, a type of dog."
    assert a.classnames() == DOG_NAMES
    assert (len(a.load("train")), len(a.load("test"))) == (14, 7)
    assert a.load("train").ids[0] == "Images/n02085620-Chihuahua/n02085620_1.jpg"
    assert _summary(a) == _summary(_plugin("stanford_dogs", tmp_path / "b"))
    c = _plugin("stanford_dogs", tmp_path / "c")
    assert c.index().layout == "coop"
    assert _summary(a) == _summary(c)
    keep = _plugin("stanford_dogs", tmp_path / "a", underscores="keep")
    assert keep.classnames()[1] == "Japanese_spaniel" and keep.classnames()[3] == "German_short-haired_pointer"


def test_id_ood_boundary_is_first_ceil_half(tmp_path):
    make_dogs(tmp_path, "official")
    p = _plugin("stanford_dogs", tmp_path)
    C = len(DOG_NAMES)
    K = math.ceil(C / 2)
    s = load_or_create(p, 2, 1, tmp_path / "results")
    assert s.K == K == 4 and s.id_classnames == DOG_NAMES[:4]
    assert set(s.labeled_y.tolist()) == set(range(K))
    assert (s.test_y_open == np.minimum(p.load("test").labels, K)).all()
    assert int((s.test_y_open == K).sum()) == 3  # OOD classes 4..6, one test image each


# -- Stanford Cars ------------------------------------------------------------------------------
CAR_META = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012",
            "Tesla Model S Sedan 2012", "smart fortwo Convertible 2012", "Volvo 240 Sedan 1993"]


def _annos(rows):
    a = np.zeros((1, len(rows)), dtype=[(n, "O") for n in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")])
    for i, (fname, c) in enumerate(rows):
        a[0, i] = (np.array([[1]]), np.array([[2]]), np.array([[10]]), np.array([[9]]), np.array([[c]], dtype=np.uint8),
                   np.array([fname]))
    return a


def make_cars(root: Path, layout: str, test_in_devkit=False) -> Path:
    d = root / "stanford_cars"
    train, test = [], []
    k = 0
    for c in range(len(CAR_META)):
        for j in range(3):
            k += 1
            (train if j < 2 else test).append((f"{k:05d}.jpg", c + 1))
    for f, _ in train:
        _img(d / "cars_train" / f, 200 + int(f[:5]))
    for f, _ in test:
        _img(d / "cars_test" / f, 300 + int(f[:5]))
    if layout == "official":
        (d / "devkit").mkdir(parents=True, exist_ok=True)
        meta = np.empty((1, len(CAR_META)), dtype=object)
        for i, n in enumerate(CAR_META):
            meta[0, i] = n
        savemat(d / "devkit" / "cars_meta.mat", {"class_names": meta})
        savemat(d / "devkit" / "cars_train_annos.mat", {"annotations": _annos(train)})
        savemat(d / ("devkit" if test_in_devkit else ".") / "cars_test_annos_withlabels.mat",
                {"annotations": _annos(test)})
    else:  # CoOp's JSON: names already year-first, train/val split of the official train set
        from ossl_datasets.stanford_cars import year_first

        rows = [[f"cars_train/{f}", c - 1, year_first(CAR_META[c - 1])] for f, c in train]
        js = {"train": rows[::3] + rows[1::3], "val": rows[2::3],
              "test": [[f"cars_test/{f}", c - 1, year_first(CAR_META[c - 1])] for f, c in test]}
        (d / "split_zhou_StanfordCars.json").write_text(json.dumps(js))
    return d


def test_cars_layouts_and_coop_names(tmp_path):
    make_cars(tmp_path / "a", "official")
    make_cars(tmp_path / "b", "official", test_in_devkit=True)
    make_cars(tmp_path / "c", "coop")
    a = _plugin("stanford_cars", tmp_path / "a")
    assert a.template == "a photo of a {}."
    # CoOp moves the year (the last word) to the front
    assert a.classnames() == ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Ram C/V Cargo Van Minivan",
                              "2012 Tesla Model S Sedan", "2012 smart fortwo Convertible", "1993 Volvo 240 Sedan"]
    tr, te = a.load("train"), a.load("test")
    assert (len(tr), len(te)) == (12, 6) and tr.ids[0] == "cars_train/00001.jpg" and te.ids[0] == "cars_test/00003.jpg"
    assert tr.labels.tolist()[:4] == [0, 0, 1, 1]
    assert _summary(a) == _summary(_plugin("stanford_cars", tmp_path / "b"))
    c = _plugin("stanford_cars", tmp_path / "c")
    assert c.index().layout == "coop"
    assert _summary(a) == _summary(c)  # CoOp train + val = the official train set
    m = build_manifest("stanford_cars", a.classnames(), tr, te, 1, 1)
    assert m["known_classnames"] == a.classnames()[:3] and m["num_test_ood"] == 3


# -- FGVC-Aircraft ------------------------------------------------------------------------------
VARIANTS = ["707-320", "A300B4", "Cessna 172", "DHC-1", "F-16A/B"]


def make_aircraft(root: Path, sub: str) -> Path:
    d = root / sub
    d.mkdir(parents=True)
    (d / "variants.txt").write_text("".join(v + "\n" for v in VARIANTS))
    k = 1000000
    lines = {"train": [], "val": [], "test": []}
    for v in VARIANTS:
        for s in ("train", "train", "val", "test"):
            k += 1
            _img(d / "images" / f"{k}.jpg", k)
            lines[s].append(f"{k} {v}\n")
    for s, ls in lines.items():
        (d / f"images_variant_{s}.txt").write_text("".join(ls))
    return d


def test_aircraft_both_placements_and_trainval(tmp_path):
    make_aircraft(tmp_path / "a", "fgvc-aircraft-2013b/data")
    make_aircraft(tmp_path / "b", "fgvc_aircraft")
    a, b = _plugin("fgvc_aircraft", tmp_path / "a"), _plugin("fgvc_aircraft", tmp_path / "b")
    assert a.template == "a photo of a {}, a type of aircraft."
    assert a.classnames() == VARIANTS
    assert (len(a.load("train")), len(a.load("test"))) == (10, 5)
    assert a.load("train").ids[0] == "images/1000001.jpg"
    assert _summary(a) == _summary(b)
    tv = _plugin("fgvc_aircraft", tmp_path / "a", trainval=True)
    assert len(tv.load("train")) == 15 and np.bincount(tv.load("train").labels).tolist() == [3] * 5


# -- errors ---------------------------------------------------------------------------------------
def test_missing_dataset_error_names_layouts_and_folders(tmp_path):
    (tmp_path / "CUB_200_2011").mkdir()
    (tmp_path / "CUB_200_2011" / "classes.txt").write_text("1 001.A\n")
    with pytest.raises(DatasetError) as e:
        _plugin("cub", tmp_path).classnames()
    msg = str(e.value)
    assert "split_zhou_CUB200.json" in msg and "train_test_split.txt" in msg  # both layouts described
    assert str(tmp_path / "cub" / "CUB_200_2011") in msg and "(no such folder)" in msg  # where we looked
    assert "official layout incomplete, missing images.txt" in msg  # the partial copy is diagnosed
    with pytest.raises(DatasetError, match="devkit/cars_meta.mat"):
        _plugin("stanford_cars", tmp_path / "nowhere").load("train")
    with pytest.raises(DatasetError, match="needs a data root"):
        _plugin("fgvc_aircraft", None).classnames()


def test_layout_option_and_unknown_options(tmp_path):
    make_cars(tmp_path, "official")
    with pytest.raises(DatasetError, match=r"(?s)layout=coop.*split_zhou_StanfordCars.json"):
        _plugin("stanford_cars", tmp_path, layout="coop").classnames()
    with pytest.raises(ConfigError, match="unknown dataset option 'trainvall'.*did you mean"):
        _plugin("stanford_cars", tmp_path, trainvall=True)
    with pytest.raises(ConfigError, match="layout must be"):
        _plugin("cub", tmp_path, layout="dassl")


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    d = make_aircraft(tmp_path, "fgvc_aircraft")
    p = _plugin("fgvc_aircraft", tmp_path)
    tr = p.load("train")
    bad = d / tr.ids[1]
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DatasetError, match=str(bad)):
        tr.image(1)
    good = d / tr.ids[2]
    good.write_bytes(good.read_bytes()[:120])  # truncated JPEG
    with pytest.raises(DatasetError, match=r"corrupt or truncated"):
        tr.image(2)
    (d / tr.ids[3]).unlink()
    with pytest.raises(DatasetError, match=r"missing"):
        tr.image(3)
    (d / "images" / "1000001.jpg").unlink()  # the first image: caught when the dataset is opened
    with pytest.raises(DatasetError, match="image folder is missing or misplaced"):
        _plugin("fgvc_aircraft", tmp_path).load("train")


def test_bad_split_json(tmp_path):
    d = make_cub(tmp_path, "coop")
    js = json.loads((d / "split_zhou_CUB200.json").read_text())
    js["test"][0][1] = 9  # a label gap
    (d / "split_zhou_CUB200.json").write_text(json.dumps(js))
    with pytest.raises(DatasetError, match="without gaps"):
        _plugin("cub", tmp_path).classnames()
    (d / "split_zhou_CUB200.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        _plugin("cub", tmp_path).classnames()


def test_partial_copy_warns(tmp_path):
    make_aircraft(tmp_path, "fgvc_aircraft")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _plugin("fgvc_aircraft", tmp_path).classnames()
    assert any("official dataset has 100 / 3334 / 3333" in str(x.message) for x in w)


# -- decoded-image cache ------------------------------------------------------------------------
def test_image_cache(tmp_path, monkeypatch):
    from ossl_datasets import _real

    monkeypatch.setenv(_real.IMAGE_CACHE_ENV, str(tmp_path / "cache"))
    d = tmp_path / "data" / "fgvc_aircraft"
    make_aircraft(tmp_path / "data", "fgvc_aircraft")
    for i, f in enumerate(sorted((d / "images").glob("*.jpg"))[:6]):
        _img(f, 7 + i, size=(60 + 7 * i, 40 + 3 * i))  # some larger than the cache size, varied aspect
    plain = _plugin("fgvc_aircraft", tmp_path / "data").load("train")
    cached = _plugin("fgvc_aircraft", tmp_path / "data", image_cache=24).load("train")
    assert cached.ids == plain.ids and cached.fingerprint() == plain.fingerprint()
    assert cached.variant == "image_cache=24" and plain.variant == ""
    for i in range(len(plain)):
        ref = plain.image(i)
        w, h = ref.size
        exp = ref.resize(_real.resized_size(w, h, 24), Image.BICUBIC) if min(w, h) > 24 else ref
        got = cached.image(i)
        assert got.mode == "RGB" and min(got.size) == min(24, min(w, h))
        assert np.array_equal(np.asarray(got), np.asarray(exp))
    files = sorted((tmp_path / "cache").glob("fgvc_aircraft-train-s24-*"))
    assert len(files) == 2  # data + index
    # a second open reuses the files: decoding is paid once
    monkeypatch.setattr(_real, "_fill", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again = _plugin("fgvc_aircraft", tmp_path / "data", image_cache=24).load("train")
    assert np.array_equal(np.asarray(again.image(0)), np.asarray(cached.image(0)))
    # another size or a changed file list gets another cache file
    with pytest.raises(AssertionError, match="rebuilt"):
        _plugin("fgvc_aircraft", tmp_path / "data", image_cache=32).load("train")
    # the frozen-feature cache tells the cached images from the originals
    from benchmark.loader import FeatureCache

    fc = FeatureCache(tmp_path / "f")
    assert fc.key("bb", "fgvc_aircraft", plain, "t") != fc.key("bb", "fgvc_aircraft", cached, "t")
    # the loader pickles without its memory map (DataLoader workers open their own)
    import pickle

    lo = pickle.loads(pickle.dumps(cached.loader))
    assert np.array_equal(np.asarray(lo(3)), np.asarray(cached.image(3)))


def test_registered_and_runs_through_the_engine(tmp_path):
    from benchmark.engine import Engine
    from conftest import toy_cfg

    for n in ("stanford_dogs", "stanford_cars", "cub", "fgvc_aircraft"):
        assert DATASETS.get(n).needs_root
    make_cub(tmp_path / "data", "official")
    cfg = toy_cfg("zsclip", shots=2, dataset="cub", sets=[f"data.root={tmp_path / 'data'}"])
    r = Engine(tmp_path / "res").run(cfg)
    assert r["num_known"] == 3 and 0 <= r["metrics"]["acc"] <= 100
    with np.load(tmp_path / "res" / "runs" / "cub" / "zsclip" / "shots2_seed1" / "predictions.npz") as z:
        assert len(z["test_logits"]) == 5 and z["test_y_open"].tolist() == [0, 1, 2, 3, 3]
