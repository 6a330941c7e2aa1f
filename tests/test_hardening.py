"""Hardening (issue 17): damaged files are quarantined and their runs redone, every numeric value has
a checked range, runners sharing a results directory agree on one complete set of tables, --force
and --dry-run check before they act, splits do not depend on the layout, FGVC-Aircraft's banner."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import typing
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from benchmark.checks import RANGES, numeric_fields
from benchmark.cli import main
from benchmark.config import DataConfig, EvalConfig, SSLConfig, TrainConfig, resolve
from benchmark.engine import CRASH_ENV, Engine, run_dir
from benchmark.errors import ConfigError
from benchmark.protocol import load_or_create, manifest_path
from benchmark.registry import DATASETS, METHODS
from conftest import TESTS, TOY_EXPERIMENT, toy_cfg

pytestmark = pytest.mark.filterwarnings("ignore:.*the official dataset has:UserWarning")
TRAIN = ["train.epochs=6", "train.checkpoint_every=2", "train.lr=0.05", "train.log_every=1"]


@pytest.fixture()
def exp(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump({**TOY_EXPERIMENT, "methods": ["zsclip", "linear_probe"],
                                 "datasets": ["toy"], "shots": [2], "seeds": [1, 2]}))
    return str(p)


def _metrics(results, cfg):
    return json.loads((run_dir(results, cfg) / "result.json").read_text())["metrics"]


def _preds(d):
    with np.load(d / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


def _truncate(path: Path, keep: float = 0.5) -> None:
    b = path.read_bytes()
    path.write_bytes(b[:int(len(b) * keep)])


def _grid(exp, out, *extra):
    return main(["--experiment", exp, "--results-dir", str(out), "--no-figures", *extra])


# -- damaged files ---------------------------------------------------------------------------------
def test_truncated_result_json_is_named_quarantined_and_redone(exp, tmp_path, capsys):
    out = tmp_path / "res"
    assert _grid(exp, out) == 0
    cfg = toy_cfg("linear_probe", shots=2, seed=1)
    good = _metrics(out, cfg)
    d = run_dir(out, cfg)
    _truncate(d / "result.json")
    capsys.readouterr()
    assert _grid(exp, out, "--status") == 0
    o = capsys.readouterr().out
    assert "[ damaged] toy/linear_probe/2-shot/seed1" in o and "result.json: not valid JSON" in o
    # --report-only refuses the grid with the file's state instead of a JSONDecodeError
    assert _grid(exp, out, "--report-only") == 1
    err = capsys.readouterr().err
    assert "tables not written" in err and "[ damaged] toy/linear_probe/2-shot/seed1" in err
    assert not (out / "tables" / "table1_acc.md").exists() and (out / "tables" / "table1_acc.md.stale").exists()
    # --force does not crash on it either, and the next run redoes it
    assert _grid(exp, out, "--force") == 0
    assert _metrics(out, cfg) == good
    assert len(list(d.glob("result.json.damaged-*"))) == 1  # kept, never deleted
    assert (out / "tables" / "table1_acc.md").exists() and not (out / "tables" / "STALE.txt").exists()


def test_truncated_predictions_npz_is_detected_and_the_run_redone(exp, tmp_path, capsys):
    out = tmp_path / "res"
    assert _grid(exp, out) == 0
    cfg = toy_cfg("linear_probe", shots=2, seed=2)
    d = run_dir(out, cfg)
    good_preds, good = _preds(d), _metrics(out, cfg)
    _truncate(d / "predictions.npz", 0.7)
    capsys.readouterr()
    assert _grid(exp, out, "--status") == 0
    o = capsys.readouterr().out
    assert "[ damaged] toy/linear_probe/2-shot/seed2" in o and "predictions.npz: not a complete archive" in o
    assert Engine(out).status(cfg) == "damaged"
    assert _grid(exp, out) == 0
    assert "1 to run" in capsys.readouterr().out
    assert _metrics(out, cfg) == good
    assert all(np.array_equal(good_preds[k], v) for k, v in _preds(d).items())
    assert len(list(d.glob("predictions.npz.damaged-*"))) == 1
    assert len(list(d.glob("archive/*/result.json"))) == 1  # the intact old result.json: archived


def test_truncated_checkpoint_and_log_records_across_a_resume(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    script = str(TESTS / "_run_one.py")
    killed = subprocess.run([sys.executable, script, str(tmp_path / "kill"), "linear_probe", *TRAIN],
                            capture_output=True, text=True, env=dict(env, **{CRASH_ENV: "5"}), cwd=TESTS)
    assert killed.returncode == 137, killed.stderr
    cfg = toy_cfg(shots=4, sets=TRAIN)
    d = run_dir(tmp_path / "kill", cfg)
    assert [json.loads(x)["step"] for x in (d / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    shutil.copytree(tmp_path / "kill", tmp_path / "trunc")
    full = Engine(tmp_path / "full").run(cfg)
    full_log = (run_dir(tmp_path / "full", cfg) / "log.jsonl").read_text().splitlines()
    # resume from the step-4 checkpoint: step 5 is logged once, the log equals the uninterrupted one
    resumed = Engine(tmp_path / "kill").run(cfg)
    assert resumed["cost"]["resumed_from_step"] == 4 and resumed["metrics"] == full["metrics"]
    assert (d / "log.jsonl").read_text().splitlines() == full_log
    # a truncated checkpoint: named, quarantined, the run starts over to the same metrics
    dt = run_dir(tmp_path / "trunc", cfg)
    _truncate(dt / "checkpoint.pt")
    eng = Engine(tmp_path / "trunc")
    assert eng.status(cfg) == "damaged"
    assert [p.name for p, _ in eng.damaged(cfg)] == ["checkpoint.pt"]
    msgs = []
    r = Engine(tmp_path / "trunc", log=msgs.append).run(cfg)
    assert r["cost"]["resumed_from_step"] is None and r["metrics"] == full["metrics"]
    assert any("checkpoint.pt" in m and "not a complete archive" in m for m in msgs)
    assert len(list(dt.glob("checkpoint.pt.damaged-*"))) == 1
    assert (dt / "log.jsonl").read_text().splitlines() == full_log


def test_truncated_split_manifest_is_set_aside_and_rewritten(exp, tmp_path, capsys):
    out = tmp_path / "res"
    assert _grid(exp, out, "--methods", "zsclip", "--seeds", "1") == 0
    p = manifest_path(out, "toy", 2, 1)
    before = json.loads(p.read_text())
    _truncate(p)
    capsys.readouterr()
    assert _grid(exp, out, "--status") == 0
    o = capsys.readouterr().out
    assert f"damaged split manifest {p}: not valid JSON" in o
    # a run that needs it: no traceback, the manifest is rewritten identically, the old one kept
    assert _grid(exp, out, "--methods", "linear_probe", "--seeds", "1") == 0
    assert json.loads(p.read_text()) == before
    assert len(list(p.parent.glob(p.name + ".damaged-*"))) == 1
    assert json.loads((run_dir(out, toy_cfg("linear_probe", 2, 1)) / "result.json").read_text())["split_hash"] == before["hash"]


# -- declared ranges -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, key, shown", [
    (["--shots", "0"], "shots", "[1, inf)"), (["--shots", "-1"], "shots", "[1, inf)"),
    (["--shots", "abc"], "shots", "'abc' is not a whole number"),
    (["--seeds", "1.5"], "seeds", "'1.5' is not a whole number"),
    (["--set", "train.epochs=0"], "train.epochs=0", "[1, inf)"),
    (["--set", "train.epochs=-1"], "train.epochs=-1", "[1, inf)"),
    (["--set", "eval.id_recall=2"], "eval.id_recall=2", "(0, 1]"),
    (["--set", "train.batch_size=0"], "train.batch_size=0", "[1, inf)"),
    (["--set", "train.lr=-1"], "train.lr=-1", "(0, inf)"),
    (["--set", "data.num_workers=-1"], "data.num_workers=-1", "[0, inf)"),
    (["--set", "linear_probe.train.epochs=0"], "train.epochs=0", "[1, inf)"),
    (["--set", "coop.params.n_ctx=0", "--methods", "coop"], "coop.params.n_ctx=0", "[1, inf)"),
    (["--datasets", "synth_dogs", "--set", "data.options.test_per_class=0"],
     "data.options.test_per_class=0", "an integer in [1, inf)"),
    (["--device", "cuda:x"], "device='cuda:x'", "expected auto, cpu, cuda or cuda:N"),
])
def test_out_of_range_values_stop_before_anything_runs(exp, tmp_path, capsys, args, key, shown):
    out = tmp_path / "res"
    assert _grid(exp, out, *args) == 2
    err = capsys.readouterr().err
    assert key in err and shown in err and "Traceback" not in err
    assert not (out / "splits").exists() and not (out / "runs").exists()  # nothing was written


def test_engine_refuses_an_out_of_range_config_given_directly(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs=0 is out of range: expected a number in \[1, inf\)"):
        Engine(tmp_path).run(toy_cfg(sets=["train.epochs=0"]))
    assert not (tmp_path / "runs").exists()


def test_every_numeric_config_value_has_a_declared_range():
    for section, dc in (("train", TrainConfig), ("ssl", SSLConfig), ("eval", EvalConfig), ("data", DataConfig)):
        for name, _ in numeric_fields(dc):
            assert f"{section}.{name}" in RANGES, f"{section}.{name} has no declared range (benchmark/checks.py)"
    for name, cls in METHODS.items():
        declared = getattr(cls, "param_ranges", {})
        for f, _ in numeric_fields(cls.Config):
            assert f in declared, f"{name}.params.{f} has no declared range (param_ranges in methods/{name}.py)"
    import inspect
    for name, cls in DATASETS.items():
        declared = getattr(cls, "option_ranges", {})
        for p in inspect.signature(cls.__init__).parameters.values():
            if isinstance(p.default, (int, float)) and not isinstance(p.default, bool) or (
                    isinstance(p.default, tuple) and p.default and all(isinstance(v, float) for v in p.default)):
                assert p.name in declared, f"dataset option {name}.{p.name} has no declared range"
    # and the shipped presets satisfy them (every run of every experiment builds)
    from benchmark.experiment import build_grid, known_experiments, load_experiment
    for e in known_experiments():
        assert build_grid(load_experiment(e), data_root="/nonexistent").runs


# -- writable results directory --------------------------------------------------------------------
def test_unwritable_results_directory_is_one_clear_error_up_front(exp, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _grid(exp, blocker / "res") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "is not writable" in err and "--results-dir" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(ro)]).returncode == 0:
        try:  # immutable: even root cannot create files in it (a real PermissionError)
            assert _grid(exp, ro) == 2
            err = capsys.readouterr().err
            assert err.count("error:") == 1 and "PermissionError" in err and str(ro) in err
            assert "FAILED" not in err
        finally:
            subprocess.run(["chattr", "-i", str(ro)])
    elif os.geteuid() != 0:
        ro.chmod(0o500)
        try:
            assert _grid(exp, ro) == 2
            assert "PermissionError" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)
    else:
        pytest.skip("root without chattr: a read-only directory cannot be made")


# -- concurrent runners, tables from complete single-config grids -----------------------------------
HOLDER = r"""
import sys, time, json
import conftest
from pathlib import Path
from benchmark.engine import Engine, RunLock, run_dir
res, n_other = Path(sys.argv[1]), int(sys.argv[2])
cfg = conftest.toy_cfg("linear_probe", shots=2, seed=2)
d = run_dir(res, cfg)
with RunLock(d):
    (res / "holder-ready").write_text("1")
    t0 = time.time()   # hold the lock until the other runner has done every other run
    while len(list((res / "runs").rglob("result.json"))) < n_other and time.time() - t0 < 240:
        time.sleep(0.2)
    Engine(res).run(cfg)
"""


def test_two_runners_on_one_results_directory_both_succeed_with_complete_tables(exp, tmp_path, capsys):
    out = tmp_path / "res"
    (out / "runs").mkdir(parents=True)
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    other = subprocess.Popen([sys.executable, str(script), str(out), "3"], cwd=TESTS, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / "holder-ready").exists():
            assert other.poll() is None, other.communicate()
            assert time.time() - t0 < 120
            time.sleep(0.2)
        rc = _grid(exp, out)
        o = capsys.readouterr().out
    finally:
        _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    assert rc == 0
    assert f"running in process {other.pid}" in o and "waiting for 1 run(s)" in o
    table = pd.read_csv(out / "tables" / "table1_acc.csv", index_col=0)
    assert "(n=" not in table.to_string()  # every cell averages both seeds
    df = pd.read_csv(out / "summary.csv")
    assert len(df[df.metric == "acc"]) == 4


def test_changed_config_without_force_marks_old_tables_stale(exp, tmp_path, capsys):
    out = tmp_path / "res"
    assert _grid(exp, out) == 0
    before = (out / "summary.csv").read_text()
    capsys.readouterr()
    assert _grid(exp, out, "--set", "linear_probe.train.lr=0.3") == 1
    err = capsys.readouterr().err
    assert "pass --force" in err.lower() and "tables not written: 2 of 4 runs" in err
    # nothing is shown as current: the old outputs are renamed *.stale, never mixed with new rows
    assert not (out / "summary.csv").exists() and not (out / "tables" / "table1_acc.md").exists()
    assert (out / "summary.csv.stale").read_text() == before
    assert "linear_probe" in (out / "tables" / "STALE.txt").read_text()
    capsys.readouterr()
    assert _grid(exp, out, "--status") == 0
    assert "tables: stale" in capsys.readouterr().out
    assert _grid(exp, out, "--set", "linear_probe.train.lr=0.3", "--force") == 0
    df = pd.read_csv(out / "summary.csv")
    assert df.groupby(["method", "shots"]).cell_hash.nunique().max() == 1
    assert not (out / "tables" / "STALE.txt").exists() and not list((out / "tables").glob("*.stale"))


def test_force_validates_the_new_config_before_archiving(exp, tmp_path, capsys):
    out = tmp_path / "res"
    assert _grid(exp, out, "--methods", "linear_probe") == 0
    cfg = toy_cfg("linear_probe", 2, 1)
    d = run_dir(out, cfg)
    good = (d / "result.json").read_text()
    # a misspelt dataset option: refused while the grid is built
    assert _grid(exp, out, "--methods", "linear_probe", "--force", "--set", "data.options.per_clas=5") == 2
    assert "per_clas" in capsys.readouterr().err
    # a misspelt method option (only the method itself knows its words): the run fails, the good
    # result stays where it was
    assert _grid(exp, out, "--methods", "linear_probe", "--force", "--set", "linear_probe.params.init=randm") == 1
    assert "randm" in capsys.readouterr().err
    assert (d / "result.json").read_text() == good and not (d / "archive").exists()


# -- dry runs --------------------------------------------------------------------------------------
def test_dry_run_checks_data_roots_layouts_and_shots(exp, tmp_path, capsys):
    assert _grid(exp, tmp_path / "r", "--dry-run") == 0
    assert capsys.readouterr().out.count("WOULD FAIL") == 0
    assert _grid(exp, tmp_path / "r", "--dry-run", "--shots", "2,9") == 1
    o = capsys.readouterr().out
    # toy has 8 training images per class: every 9-shot run would fail, the 2-shot ones would not
    assert o.count("WOULD FAIL") == 4 and "fewer than shots=9" in o and "--shots 8 or fewer" in o
    assert all("WOULD FAIL" not in ln for ln in o.splitlines() if "/2-shot/" in ln)
    assert _grid(exp, tmp_path / "r", "--dry-run", "--datasets", "fgvc_aircraft",
                 "--data-root", str(tmp_path / "nowhere")) == 1
    o = capsys.readouterr().out
    assert o.count("WOULD FAIL") == 4 and "no dataset found under --data-root" in o and "variants.txt" in o
    assert o.count("Expected one of these layouts") == 1 and o.count("(as above)") == 3  # explained once
    assert _grid(exp, tmp_path / "r", "--dry-run", "--datasets", "cub") == 1
    assert "needs a data root" in capsys.readouterr().out


# -- layout-independent splits, FGVC-Aircraft banner -----------------------------------------------
def test_split_manifest_is_the_same_in_both_cars_layouts(tmp_path):
    from test_real_datasets import make_cars

    make_cars(tmp_path / "off", "official")
    make_cars(tmp_path / "coop", "coop")
    a = DATASETS.get("stanford_cars")(root=tmp_path / "off")
    b = DATASETS.get("stanford_cars")(root=tmp_path / "coop")
    assert b.index().layout == "coop" and a.index().layout == "official"
    assert a.load("train").ids == b.load("train").ids  # one canonical order
    for seed in (1, 2, 3):
        ma = load_or_create(a, 1, seed, tmp_path / "ra").manifest
        mb = load_or_create(b, 1, seed, tmp_path / "rb").manifest
        assert ma == mb
    # build_manifest itself samples in canonical order, whatever order a plugin lists the samples in
    from benchmark.data import Split
    from benchmark.protocol import build_manifest
    tr, te = a.load("train"), a.load("test")
    rev = Split(ids=tr.ids[::-1], labels=tr.labels[::-1], loader=tr.loader)
    assert build_manifest("c", a.classnames(), rev, te, 1, 5) == build_manifest("c", a.classnames(), tr, te, 1, 5)


def _aircraft_with_banner(root: Path) -> Path:
    from PIL import Image

    from test_real_datasets import VARIANTS

    d = root / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("".join(v + "\n" for v in VARIANTS))
    lines = {"train": [], "val": [], "test": []}
    k = 1000000
    for v in VARIANTS:
        for s in ("train", "train", "val", "test"):
            k += 1
            img = np.full((60, 40, 3), 90, np.uint8)
            img[-20:] = 255  # the banner: the bottom 20 rows
            Image.fromarray(img).save(d / "images" / f"{k}.jpg", format="PNG")  # lossless pixels
            lines[s].append(f"{k} {v}\n")
    for s, ls in lines.items():
        (d / f"images_variant_{s}.txt").write_text("".join(ls))
    return d


def test_fgvc_aircraft_crop_banner_option(tmp_path, monkeypatch):
    _aircraft_with_banner(tmp_path)
    keep = DATASETS.get("fgvc_aircraft")(root=tmp_path)
    img = np.asarray(keep.load("train").image(0))
    assert img.shape == (60, 40, 3) and (img[-20:] == 255).all()  # default: CoOp's pixels, banner kept
    crop = DATASETS.get("fgvc_aircraft")(root=tmp_path, crop_banner=True)
    img = np.asarray(crop.load("train").image(0))
    assert img.shape == (40, 40, 3) and (img == 90).all()  # exactly the banner rows removed
    assert crop.load("train").variant != keep.load("train").variant  # feature cache keys differ
    # through the decoded-image cache too (cropped before the cache resizes)
    monkeypatch.setenv("OSSL_IMAGE_CACHE_DIR", str(tmp_path / "cache"))
    cached = DATASETS.get("fgvc_aircraft")(root=tmp_path, crop_banner="true", image_cache=20)
    img = np.asarray(cached.load("test").image(0))
    assert img.shape == (20, 20, 3) and np.abs(img.astype(int) - 90).max() <= 1
    # and the option is part of the run's config hash
    from benchmark.config import config_hash
    e = {**TOY_EXPERIMENT, "config": {"data": {"root": str(tmp_path)}}}
    h = [config_hash(resolve(METHODS.get("zsclip"), "fgvc_aircraft", 1, 1, e, sets))
         for sets in ([], ["data.options.crop_banner=true"])]
    assert h[0] != h[1]


# -- loader workers --------------------------------------------------------------------------------
def test_loader_workers_adapt_to_the_machine(monkeypatch):
    from benchmark.experiment import build_grid, load_experiment
    from benchmark.loader import eval_loader, loader_workers

    cfg = build_grid(load_experiment("paper"), data_root="/nonexistent").runs[0]
    assert cfg.data.num_workers is None  # the paper preset leaves it to the machine
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert loader_workers(None, cuda) == 2 and loader_workers(None, cpu) == 0
    assert loader_workers(3, cuda) == 3  # an explicit value is kept
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loader_workers(None, cuda) == 8
    monkeypatch.undo()
    toy = DATASETS.get("toy")()
    split = toy.load("test")

    def warns(n):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            eval_loader(split, np.arange(4), lambda im: torch.zeros(1), 2, n).check_worker_number_rationality()
        return [x for x in w if "worker" in str(x.message)]
    assert not warns(loader_workers(None, cuda))  # what auto gives here: no DataLoader warning
    assert warns(len(os.sched_getaffinity(0)) + 8)  # the check itself can fire


def test_auto_workers_are_recorded_as_resolved(tmp_path):
    r = Engine(tmp_path).run(toy_cfg("zsclip", shots=2))
    assert r["config"]["data"]["num_workers"] == 0  # CPU: auto = 0


def test_synthetic_labels_without_rendering_match_the_loaded_split():
    """--dry-run reads labels through DatasetPlugin.labels; the embedded world's shortcut (no
    rendering) must give exactly the rendered split's labels."""
    for name in ("synth_dogs", "synth_aircraft"):
        p = DATASETS.get(name)(n_known=3, train_per_class=2, test_per_class=1)
        for s in ("train", "test"):
            assert np.array_equal(p.labels(s), p.load(s).labels)
